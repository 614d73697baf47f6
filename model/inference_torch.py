"""The torch serving pipeline, for encoders the compiled kernel does not run (Conv1d, CNN).

Imported only when such a model is exported or loaded (see :mod:`oclust.model.inference`).

Example:
    >>> import numpy as np
    >>> from oclust.model import OnlineClusterer
    >>> X = np.random.default_rng(0).normal(size=(32, 3, 20)).astype("float32")
    >>> clf = OnlineClusterer(n_clusters=2, latent_dim=4, random_state=0, device="cpu")
    >>> inf = clf.partial_fit(X).export()
    >>> inf.backend, inf.single_path, inf(X[:2]).soft.shape
    ('torch', 'traced', (2, 2))
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from oclust.model.inference import Assignment
from oclust.model.regularisers import serve, sq_distances

__all__ = ["TorchInference"]

log = logging.getLogger(__name__)

SingleAssign = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


class _Pipeline(nn.Module):
    """scaler -> encoder -> squared distances -> the served rule (``oclust.model.regularisers.serve``)
    -> (labels, distances, soft assignments, latents)."""

    def __init__(
        self, scaler: nn.Module, encoder: nn.Module, centroids: torch.Tensor, sigma: float,
        head: nn.Module | None,
    ) -> None:
        super().__init__()
        self.scaler = scaler
        self.encoder = encoder
        self.head = head
        self.register_buffer("centroids", centroids)
        self.sigma = sigma

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder(self.scaler(x))
        labels, dist, logits = serve(z, sq_distances(z, self.centroids), self.sigma, self.head)
        return labels, dist, torch.softmax(logits, dim=1), z


class TorchInference:
    """scaler -> encoder -> serving centroids -> the served rule, in torch (eval mode).

    Batches run eagerly; single samples, the latency-critical case, run the pipeline
    TorchScript-traced and frozen when that reproduces eager mode on probes
    (``single_path == "traced"``), else eagerly (``"eager"``).
    """

    backend = "torch"

    def __init__(
        self,
        scaler: nn.Module | None,
        encoder: nn.Module,
        centroids: torch.Tensor,
        sigma: float,
        head: nn.Module | None,
        input_shape: tuple[int, ...],
        device: torch.device,
        trace: bool = True,
    ) -> None:
        self.pipeline = _Pipeline(scaler if scaler is not None else nn.Identity(),
                                  encoder, centroids, float(sigma), head).eval()
        self.n_clusters = int(centroids.shape[0])
        self.input_shape = tuple(input_shape)
        self.device = device
        self.single = _trace(self.pipeline, self.input_shape, device) if trace else None
        self.single_path = "traced" if self.single is not None else "eager"

    def __call__(self, batch: np.ndarray) -> Assignment:
        """Assign a validated float32 batch of shape (N, *input_shape)."""
        if self.single is not None and len(batch) == 1:
            labels, dist, soft, latents = self.single(batch)
        else:
            x = torch.from_numpy(batch)
            if self.device.type != "cpu":
                x = x.to(self.device)
            with torch.inference_mode():
                out = self.pipeline(x)
            labels, dist, soft, latents = (t.cpu().numpy() for t in out)
        return Assignment(labels, dist.astype(np.float64), soft, latents.astype(np.float32))

    @property
    def centroids(self) -> np.ndarray:
        """The serving centroids, float32 (K, m)."""
        return self.pipeline.centroids.detach().cpu().numpy().astype(np.float32)


def _trace(
    pipeline: nn.Module, input_shape: tuple[int, ...], device: torch.device
) -> SingleAssign | None:
    """Traced + frozen single-sample pipeline, or ``None`` if it does not match eager mode."""
    gen = torch.Generator().manual_seed(0)
    probes = [torch.randn((1, *input_shape), generator=gen).to(device) * s for s in (0.5, 2, 8)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarning: branches baked in, as intended
            with torch.inference_mode():
                traced = torch.jit.freeze(
                    torch.jit.trace(pipeline, probes[0], check_trace=False).eval()
                )
                for probe in probes * 2:  # also warms the executor up
                    want, got = pipeline(probe), traced(probe)
                    if not (
                        torch.equal(want[0], got[0])
                        and torch.allclose(want[1], got[1], rtol=1e-4, atol=1e-5)
                    ):
                        raise ValueError("traced pipeline disagrees with eager mode")
    except Exception as exc:  # tracing is an optimisation: fall back to eager mode
        log.warning("single-sample fast path unavailable, serving eagerly: %s", exc)
        return None

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # frozen graph: weights are constants, nothing requires grad, so no context needed
        out = traced(torch.from_numpy(batch).to(device))
        labels, dist, soft, latents = (t.cpu().numpy() for t in out)
        return labels, dist, soft, latents

    return run
