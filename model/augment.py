"""Seeded data augmentations: the views of a batch that training pulls toward the same cluster.

The methods that contrast two views (``uses_views = True``: ``drc``, ``tcc``) draw theirs here,
and so does the clusterer's ``views`` option (on by default for images trained with CA), which
pulls one augmented view of each sample to the centroid of the sample's label. Every function
takes an explicit ``torch.Generator`` (same generator state, same views), keeps the batch's
shape, dtype and device, and works on standardised inputs (unit scale), so the default strengths
are in standard deviations.

Three families: the contrastive methods pick theirs from the per-sample shape with the same rule
as the encoders (:func:`kind_for_shape`), the clusterer from its encoder
(:func:`kind_for_encoder`):

* ``vector`` (D,): additive Gaussian noise and feature dropout.
* ``window`` (C, T) sensor windows: jitter, scaling, magnitude warp and time shift. Scaling, warp
  and shift are channel-consistent: one factor, one warp curve and one shift per window, shared
  by all its channels, so the relation between the axes of a sensor is kept.
* ``image`` (H, W) or (C, H, W): a small random shift (pad and crop) and pixel noise.

Example:
    >>> import torch
    >>> from oclust.model.augment import augment
    >>> x = torch.randn(4, 6, 100)
    >>> g = torch.Generator().manual_seed(0)
    >>> v = augment(x, g)
    >>> v.shape == x.shape and v.dtype == x.dtype
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oclust.model.encoder_config import IMAGE_KINDS, WINDOW_KINDS, EncoderConfig

__all__ = [
    "KINDS",
    "augment",
    "augment_images",
    "augment_vectors",
    "augment_windows",
    "kind_for_encoder",
    "kind_for_shape",
    "seeded_generator",
]

KINDS = ("vector", "window", "image")


def kind_for_shape(sample_shape: tuple[int, ...]) -> str:
    """The augmentation family for a per-sample shape (the encoders' ``auto`` rule).

    >>> kind_for_shape((64,)), kind_for_shape((6, 100)), kind_for_shape((28, 28))
    ('vector', 'window', 'image')
    """
    return kind_for_encoder(EncoderConfig.for_shape(tuple(sample_shape), kind="auto").kind)


def kind_for_encoder(encoder: str) -> str:
    """The augmentation family of the input an encoder kind reads.

    >>> kind_for_encoder("mlp"), kind_for_encoder("lenet1d"), kind_for_encoder("convnet")
    ('vector', 'window', 'image')
    """
    return "image" if encoder in IMAGE_KINDS else "window" if encoder in WINDOW_KINDS else "vector"


def seeded_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of a seeded stream's ``step``-th batch of views: the same (seed, step),
    the same views on the same kind of device (CUDA and CPU generators differ).

    >>> a, b = (seeded_generator(3, 1, torch.device("cpu")) for _ in range(2))
    >>> torch.equal(torch.rand(2, generator=a), torch.rand(2, generator=b))
    True
    """
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) * 1_000_003 + int(step))
    return g


def _normal(shape: tuple[int, ...], like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=g.device).to(like)


def _uniform(shape: tuple[int, ...], like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=g.device).to(like)


def augment_vectors(
    x: torch.Tensor, g: torch.Generator, noise: float = 0.2, dropout: float = 0.1
) -> torch.Tensor:
    """Feature vectors (N, D): Gaussian noise of std ``noise``, then zero a ``dropout`` share.

    Dropped features are set to 0, the mean of a standardised feature.

    >>> import torch
    >>> augment_vectors(torch.ones(2, 3), torch.Generator().manual_seed(0), 0.0, 0.0).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    out = x + noise * _normal(tuple(x.shape), x, g)
    keep = (_uniform(tuple(x.shape), x, g) >= dropout).to(x)
    return out * keep


def _magnitude_curve(
    n: int, t: int, like: torch.Tensor, g: torch.Generator, sigma: float, knots: int
) -> torch.Tensor:
    """Smooth random curves (N, 1, T) around 1: random knots, linearly interpolated."""
    k = _normal((n, 1, knots), like, g) * sigma + 1.0
    return F.interpolate(k, size=t, mode="linear", align_corners=True)


def _roll_time(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Circularly shift each window (N, C, T) by its own number of steps, all channels alike."""
    n, c, t = x.shape
    idx = (torch.arange(t, device=x.device)[None, :] - shifts[:, None]) % t  # N×T
    return x.gather(2, idx[:, None, :].expand(n, c, t))


def augment_windows(
    x: torch.Tensor,
    g: torch.Generator,
    jitter: float = 0.05,
    scale: float = 0.1,
    warp: float = 0.2,
    warp_knots: int = 4,
    max_shift: float = 0.1,
) -> torch.Tensor:
    """Sensor windows (N, C, T): jitter, scaling, magnitude warp and time shift.

    ``jitter`` is per-reading noise (std); ``scale`` the std of one factor per window; ``warp``
    the std of a smooth multiplicative curve through ``warp_knots`` knots; ``max_shift`` the
    largest circular time shift as a fraction of T. Scaling, warp and shift are shared by all
    channels of a window.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> augment_windows(torch.zeros(2, 3, 50), g).abs().sum().item() > 0
    True
    """
    if x.dim() != 3:
        raise ValueError(f"windows must be a batch (N, C, T), got shape {tuple(x.shape)}")
    n, _, t = x.shape
    factor = 1.0 + scale * _normal((n, 1, 1), x, g)
    curve = _magnitude_curve(n, t, x, g, warp, max(2, warp_knots))
    out = x * factor * curve + jitter * _normal(tuple(x.shape), x, g)
    limit = int(max_shift * t)
    if limit > 0:
        shifts = torch.randint(-limit, limit + 1, (n,), generator=g, device=g.device)
        out = _roll_time(out, shifts.to(x.device))
    return out


def augment_images(
    x: torch.Tensor, g: torch.Generator, max_shift: int = 1, noise: float = 0.1
) -> torch.Tensor:
    """Images (N, H, W) or (N, C, H, W): a random shift of up to ``max_shift`` pixels each way
    (zero padding, then a crop back to H×W) and Gaussian pixel noise.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> augment_images(torch.zeros(2, 8, 8), g).shape
    torch.Size([2, 8, 8])
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"images must be (N, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
    img = x[:, None] if x.dim() == 3 else x
    n, c, h, w = img.shape
    if max_shift > 0:
        s = int(max_shift)
        padded = F.pad(img, (s, s, s, s))
        dy = torch.randint(0, 2 * s + 1, (n,), generator=g, device=g.device).to(x.device)
        dx = torch.randint(0, 2 * s + 1, (n,), generator=g, device=g.device).to(x.device)
        rows = dy[:, None] + torch.arange(h, device=x.device)[None, :]  # N×H
        cols = dx[:, None] + torch.arange(w, device=x.device)[None, :]  # N×W
        padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * s))
        img = padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    img = img + noise * _normal(tuple(img.shape), img, g)
    return img[:, 0] if x.dim() == 3 else img


def augment(x: torch.Tensor, g: torch.Generator, kind: str = "auto") -> torch.Tensor:
    """One augmented view of a batch, with the family picked from the per-sample shape.

    ``kind`` forces a family: ``vector``, ``window`` or ``image``.
    """
    if not x.is_floating_point():
        raise ValueError(f"augmentations need a floating-point batch, got {x.dtype}")
    if kind == "auto":
        kind = kind_for_shape(tuple(x.shape[1:]))
    if kind == "vector":
        return augment_vectors(x.reshape(len(x), -1), g).reshape(x.shape)
    if kind == "window":
        return augment_windows(x, g)
    if kind == "image":
        return augment_images(x, g)
    raise ValueError(f"unknown augmentation kind {kind!r}; choose from {', '.join(KINDS)}")
