"""Encoders: the network f that maps a sample to a latent vector.

Three families, chosen from the per-sample input shape unless configured:
``mlp`` for feature vectors (D,), ``conv1d`` for multichannel windows (C, T), ``cnn`` for
single-channel images (H, W) or (1, H, W). :class:`EncoderConfig` lives in the torch-free
:mod:`model.encoder_config` (re-exported here), so the manifest can be read without torch.

Example:
    >>> import torch
    >>> from model.encoders import EncoderConfig, build_encoder
    >>> cfg = EncoderConfig.for_shape((64,), latent_dim=16)
    >>> build_encoder(cfg)(torch.zeros(3, 64)).shape
    torch.Size([3, 16])
"""

from __future__ import annotations

import torch
from torch import nn

from model.encoder_config import ENCODERS, NORM_EPS, EncoderConfig

__all__ = ["ENCODERS", "EncoderConfig", "build_encoder"]


class MLPEncoder(nn.Module):
    """Fully connected encoder for feature vectors."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = cfg.input_shape[0]
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
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


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """Instantiate the encoder a config describes, with its latent normalisation."""
    body = {"mlp": MLPEncoder, "conv1d": Conv1dEncoder, "cnn": CNNEncoder}[cfg.kind](cfg)
    if cfg.latent_norm == "batch":
        return nn.Sequential(body, nn.BatchNorm1d(cfg.latent_dim, NORM_EPS, affine=False))
    if cfg.latent_norm == "layer":
        return nn.Sequential(body, nn.LayerNorm(cfg.latent_dim, NORM_EPS, elementwise_affine=False))
    if cfg.latent_norm == "none":
        return body
    raise ValueError(f"unknown latent_norm {cfg.latent_norm!r}; choose batch, layer or none")
