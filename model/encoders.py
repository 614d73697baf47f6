"""Encoders: the network f that maps a sample to a latent vector.

Chosen from the per-sample input shape unless configured: ``mlp`` for feature vectors (D,)
(Linear, BatchNorm and ReLU per hidden layer),
``conv1d`` for multichannel windows (C, T), ``convnet`` for images (H, W) or (C, H, W): 3×3
convolutions with batch norm, each followed by 2×2 max pooling, then a linear head on the
flattened maps (28×28 → 14×14 → 7×7, so it trains at a useful rate on a CPU). Also available:
``cnn`` (the earlier full-resolution CNN, global average pooled), and the CA paper's encoders
``lenet`` (Conv2d(1,6,5)+BN+ReLU+MaxPool(2), Conv2d(6,16,5)+BN+ReLU+MaxPool(2),
Linear(256→128) on 28×28) and its 1-D analogue ``lenet1d`` for (C, T) windows.
:class:`EncoderConfig` lives in the torch-free :mod:`oclust.model.encoder_config` (re-exported
here), so that a manifest can be read without torch.

Example:
    >>> import torch
    >>> from oclust.model.encoders import EncoderConfig, build_encoder
    >>> cfg = EncoderConfig.for_shape((64,), latent_dim=16)
    >>> build_encoder(cfg)(torch.zeros(3, 64)).shape
    torch.Size([3, 16])
"""

from __future__ import annotations

import math

import torch
from torch import nn

from oclust.model.encoder_config import (
    DEFAULT_HIDDEN,
    ENCODERS,
    IMAGE_KINDS,
    NORM_EPS,
    EncoderConfig,
)

__all__ = [
    "DEFAULT_HIDDEN", "ENCODERS", "IMAGE_KINDS", "EncoderConfig", "build_encoder", "split_stem",
]


class MLPEncoder(nn.Module):
    """Fully connected encoder for feature vectors: Linear, BatchNorm, ReLU per hidden layer
    (without BatchNorm for ``hidden_norm="none"``, the MLP of snapshots saved before it)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = math.prod(cfg.input_shape)  # the flattened sample (a window, an image)
        for h in cfg.hidden:
            norm = [nn.BatchNorm1d(h)] if cfg.hidden_norm == "batch" else []
            layers += [nn.Linear(width, h), *norm, nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, cfg.latent_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class Conv1dEncoder(nn.Module):
    """Temporal convolutions over multichannel windows (C × T), global average pooled."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        channels = cfg.input_shape[0]
        layers: list[nn.Module] = []
        for h in cfg.hidden:
            layers += [nn.Conv1d(channels, h, 5, padding=2), nn.BatchNorm1d(h), nn.ReLU()]
            channels = h
        self.conv = nn.Sequential(*layers)
        self.head = nn.Linear(channels, cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=2))


class CNNEncoder(nn.Module):
    """Small 2-D CNN for images (H × W or C × H × W)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        shape = cfg.input_shape
        channels = 1 if len(shape) == 2 else shape[0]
        layers: list[nn.Module] = []
        for h in cfg.hidden:
            layers += [nn.Conv2d(channels, h, 3, padding=1), nn.ReLU()]
            channels = h
        self.conv = nn.Sequential(*layers)
        self.head = nn.Linear(channels, cfg.latent_dim)
        self._add_channel = len(shape) == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._add_channel:
            x = x.unsqueeze(1)
        return self.head(self.conv(x).mean(dim=(2, 3)))


class PooledConvEncoder(nn.Module):
    """Conv + BatchNorm + ReLU + MaxPool(2) per hidden width, then Linear on the flat maps.

    2-D for images (H, W) / (C, H, W), 1-D for windows (C, T). ``kernel``/``padding`` 3/1 keep
    the size before each pooling (``convnet``); 5/0 is the LeNet layout of the CA paper.
    """

    def __init__(self, cfg: EncoderConfig, dims: int, kernel: int, padding: int) -> None:
        super().__init__()
        shape = cfg.input_shape
        self._add_channel = dims == 2 and len(shape) == 2
        channels = 1 if self._add_channel else shape[0]
        size = list(shape[-dims:])
        conv, norm, pool = (
            (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if dims == 2
            else (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d)
        )
        layers: list[nn.Module] = []
        for h in cfg.hidden:
            size = [s + 2 * padding - kernel + 1 for s in size]
            if min(size) < 1:
                raise ValueError(f"input {shape} is too small for {len(cfg.hidden)} conv layers")
            layers += [conv(channels, h, kernel, padding=padding), norm(h), nn.ReLU()]
            if min(size) >= 2:  # pool while there is something to halve
                layers.append(pool(2))
                size = [s // 2 for s in size]
            channels = h
        self.conv = nn.Sequential(*layers)
        self.head = nn.Linear(channels * math.prod(size), cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._add_channel:
            x = x.unsqueeze(1)
        return self.head(self.conv(x).flatten(1))


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """Instantiate the encoder a config describes, with its latent normalisation.

    >>> cfg = EncoderConfig.for_shape((28, 28), kind="lenet", latent_norm="none")
    >>> build_encoder(cfg).head.in_features  # 16 channels × 4 × 4, as in the CA paper
    256
    """
    builders = {
        "mlp": MLPEncoder,
        "conv1d": Conv1dEncoder,
        "cnn": CNNEncoder,
        "convnet": lambda c: PooledConvEncoder(c, 2, 3, 1),
        "lenet": lambda c: PooledConvEncoder(c, 2, 5, 0),
        "lenet1d": lambda c: PooledConvEncoder(c, 1, 5, 0),
    }
    body = builders[cfg.kind](cfg)
    if cfg.latent_norm == "batch":
        return nn.Sequential(body, nn.BatchNorm1d(cfg.latent_dim, NORM_EPS, affine=False))
    if cfg.latent_norm == "layer":
        return nn.Sequential(body, nn.LayerNorm(cfg.latent_dim, NORM_EPS, elementwise_affine=False))
    if cfg.latent_norm == "none":
        return body
    raise ValueError(f"unknown latent_norm {cfg.latent_norm!r}; choose batch, layer or none")


def split_stem(encoder: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """``encoder`` as (stem, rest), with ``rest(stem(x))`` computing ``encoder(x)``: the stem is
    the batch-normalised MLP's first Linear layer, which computes the same in training and in
    inference, so that a training step's two passes (see the clusterer's ``_eval_latents``) can
    share it; on wide inputs it is most of the MLP's work. ``(None, encoder)`` for the others.

    >>> enc = build_encoder(EncoderConfig.for_shape((64,), latent_dim=16)).eval()
    >>> stem, rest = split_stem(enc)
    >>> x = torch.randn(3, 64)
    >>> torch.equal(rest(stem(x)), enc(x))
    True
    """
    wrapped = isinstance(encoder, nn.Sequential)  # the MLP and its latent normalisation
    body, tail = (encoder[0], list(encoder)[1:]) if wrapped else (encoder, [])
    if not (isinstance(body, MLPEncoder) and len(body.net) > 1
            and isinstance(body.net[1], nn.BatchNorm1d)):
        return None, encoder
    return nn.Sequential(nn.Flatten(1), body.net[0]), nn.Sequential(*body.net[1:], *tail)
