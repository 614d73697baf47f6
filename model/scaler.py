"""Streaming input standardisation: running mean and variance with Welford's batch update,
then an optional clip of the standardised values (winsorising).

Example:
    >>> import torch
    >>> from oclust.model.scaler import RunningScaler
    >>> s = RunningScaler((2,), (0,), clip=5.0)
    >>> s.update(torch.tensor([[0.0, 10.0], [2.0, 30.0]]))
    >>> s(torch.tensor([[1.0, 20.0], [100.0, 20.0]])).tolist()
    [[0.0, 0.0], [5.0, 0.0]]
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from oclust.model.encoders import IMAGE_KINDS, EncoderConfig

__all__ = ["CONSTANT_SPREAD", "RunningScaler", "scaler_for"]

#: A feature whose standard deviation is at most this fraction of its mean's magnitude (float32
#: cannot tell its values apart) counts as constant, and passes through unscaled, as does one
#: whose spread is below float32's smallest normal number. Relative, so that data on any scale
#: (1e-7 as 1e7) is standardised
CONSTANT_SPREAD = 1e-6
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


class RunningScaler(nn.Module):
    """Streaming per-feature (or per-channel) standardisation with Welford's batch update.

    A constant feature (:data:`CONSTANT_SPREAD`) passes through unscaled. ``clip``:
    standardised values are clipped to ±clip (standard deviations); ``None``: not clipped. A
    feature that is almost always constant (a border pixel, a rarely-firing sensor) otherwise
    standardises to values of 20–200 on the rare samples where it moves, and those
    few inputs dominate the encoder's first layer; a sensor glitch does the same.
    """

    def __init__(
        self, stat_shape: tuple[int, ...], reduce_dims: tuple[int, ...],
        clip: float | None = None,
    ) -> None:
        super().__init__()
        self.reduce_dims = reduce_dims
        self.clip = clip
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(stat_shape, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(stat_shape, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        """Merge the batch statistics into the running ones (Chan et al.)."""
        xd = x.to(torch.float64)
        n_b = float(np.prod([x.shape[d] for d in self.reduce_dims]))
        mean_b = xd.mean(dim=self.reduce_dims)
        m2_b = ((xd - self._expand(mean_b)) ** 2).sum(dim=self.reduce_dims)
        n_a = self.count.item()
        delta = mean_b - self.mean
        total = n_a + n_b
        self.mean += delta * (n_b / total)
        self.m2 += m2_b + delta**2 * (n_a * n_b / total)
        self.count += n_b

    def moments(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) in float64 that :meth:`forward` standardises with; ``None``: identity."""
        if self.count.item() < 2:
            return None
        std = (self.m2 / (self.count - 1)).sqrt()
        constant = std <= (self.mean.abs() * CONSTANT_SPREAD).clamp_min(FLOAT32_TINY)
        std = torch.where(constant, torch.ones_like(std), std)  # constant features pass through
        return self.mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.moments()
        if stats is None:
            return x
        z = (x - self._expand(stats[0]).to(x)) / self._expand(stats[1]).to(x)
        clip = getattr(self, "clip", None)  # a module pickled before the attribute: none
        return z if clip is None else z.clamp(-clip, clip)  # NaN stays NaN

    def _expand(self, stat: torch.Tensor) -> torch.Tensor:
        shape = [1] * (len(self.reduce_dims) + stat.dim())
        kept = [d for d in range(len(shape)) if d not in self.reduce_dims]
        for d, s in zip(kept, stat.shape, strict=True):
            shape[d] = s
        return stat.reshape(shape)


def scaler_for(cfg: EncoderConfig, clip: float | None = None) -> RunningScaler:
    """The scaler of an encoder's input: per feature, per channel, or one global statistic."""
    shape = cfg.input_shape
    if len(shape) == 1:  # per feature
        return RunningScaler(shape, (0,), clip)
    if cfg.kind in IMAGE_KINDS and len(shape) == 2:  # single-channel image: one global statistic
        return RunningScaler((), (0, 1, 2), clip)
    return RunningScaler((shape[0],), (0, *range(2, len(shape) + 1)), clip)  # per channel
