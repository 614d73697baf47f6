"""A NumPy path for single-sample inference of MLP encoders (the latency-critical case).

For one sample, torch spends most of its time in per-operator overhead (dispatch, allocation,
autograd bookkeeping), not in arithmetic; the same computation as a handful of NumPy calls is
several times faster, especially in a busy server process. :func:`compile_numpy` lowers a
serving pipeline (affine input scaler -> encoder -> squared distances -> softmax) to NumPy when
the encoder is built only from layers it knows (``Linear``, ``ReLU``, ``LayerNorm``,
``BatchNorm1d`` in eval mode, ``Identity``, ``Flatten``, ``Sequential`` and the model's
``MLPEncoder``), folds the scaler into the first linear layer, and then **checks the result
against the torch pipeline on random probes**; any mismatch or unknown layer returns ``None``
and the caller keeps using torch.

Example:
    >>> import numpy as np, torch
    >>> from torch import nn
    >>> enc = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> fn = compile_numpy(nn.Identity(), enc, torch.randn(2, 4), sigma=1.0, input_shape=(3,))
    >>> labels, dist, soft = fn(np.zeros((1, 3), np.float32))
    >>> labels.shape, soft.shape
    ((1,), (1, 2))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["NumpyAssign", "compile_numpy"]

log = logging.getLogger("oclust.service")

NumpyAssign = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
Op = Callable[[np.ndarray], np.ndarray]


class Unsupported(Exception):
    """A layer the NumPy path does not know."""


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


def _lower(module: nn.Module) -> list[tuple[str, tuple[np.ndarray, ...]]]:
    """The module as a list of (op, parameters), or :class:`Unsupported`."""
    if isinstance(module, nn.Sequential):
        return [op for child in module for op in _lower(child)]
    if type(module).__name__ == "MLPEncoder" and isinstance(getattr(module, "net", None),
                                                            nn.Sequential):
        return [("flatten", ()), *_lower(module.net)]
    if isinstance(module, nn.Linear):
        bias = module.bias if module.bias is not None else torch.zeros(module.out_features)
        return [("linear", (_f32(module.weight).T.copy(), _f32(bias)))]
    if isinstance(module, nn.ReLU):
        return [("relu", ())]
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return [("flatten", ())]
    if isinstance(module, nn.Identity):
        return []
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        n = module.normalized_shape[0]
        weight = _f32(module.weight) if module.weight is not None else np.ones(n, np.float32)
        bias = _f32(module.bias) if module.bias is not None else np.zeros(n, np.float32)
        return [("layernorm", (np.float32(module.eps), weight, bias))]
    if (isinstance(module, nn.BatchNorm1d) and not module.training
            and module.running_mean is not None and module.running_var is not None):
        scale = 1.0 / torch.sqrt(module.running_var.double() + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.double()
        shift = -module.running_mean.double() * scale
        if module.bias is not None:
            shift = shift + module.bias.double()
        return [("affine", (_f32(scale), _f32(shift)))]
    raise Unsupported(type(module).__name__)


def _affine_of(scaler: nn.Module, input_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with scaler(x) == x * a + b, found by probing; :class:`Unsupported` if not affine."""
    with torch.no_grad():
        zero = torch.zeros((1, *input_shape), dtype=torch.float64)
        b = scaler(zero).double()
        a = scaler(zero + 1.0).double() - b
        probe = torch.randn((4, *input_shape), generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64) * 3
        if not torch.allclose(scaler(probe).double(), probe * a + b, rtol=1e-5, atol=1e-6):
            raise Unsupported("the input scaler is not affine")
    return a[0].reshape(-1).numpy(), b[0].reshape(-1).numpy()


def _op(name: str, params: tuple[np.ndarray, ...]) -> Op:
    if name == "linear":
        weight, bias = params

        def linear(x: np.ndarray) -> np.ndarray:
            out = x @ weight
            out += bias
            return out

        return linear
    if name == "relu":
        return lambda x: np.maximum(x, 0, out=x)
    if name == "flatten":
        return lambda x: x.reshape(len(x), -1)
    if name == "affine":
        scale, shift = params
        return lambda x: x * scale + shift
    if name == "layernorm":
        eps, weight, bias = params

        def layernorm(x: np.ndarray) -> np.ndarray:  # called under errstate(ignore) below
            inv_n = np.float32(1.0 / x.shape[1])  # sum * 1/n: cheaper than .mean() per call
            x = x - x.sum(axis=1, keepdims=True) * inv_n
            var = (x * x).sum(axis=1, keepdims=True) * inv_n
            var[~np.isfinite(var)] = np.nan  # overflow must surface as NaN, as in torch
            x /= np.sqrt(var + eps)
            return x * weight + bias

        return layernorm
    raise Unsupported(name)


def _build(
    scaler: nn.Module, encoder: nn.Module, centroids: torch.Tensor, sigma: float,
    input_shape: tuple[int, ...],
) -> NumpyAssign:
    ops = _lower(encoder)
    a, b = _affine_of(scaler, input_shape)
    if ops and ops[0][0] == "flatten":
        ops = ops[1:]
    if not ops or ops[0][0] != "linear":
        raise Unsupported("the encoder does not start with a linear layer")
    weight, bias = ops[0][1]
    w64 = weight.astype(np.float64)  # fold the scaler: (x a + b) W + c = x (a W) + (b W + c)
    ops[0] = ("linear", ((a[:, None] * w64).astype(np.float32),
                         (b @ w64 + bias).astype(np.float32)))
    layers = [_op(name, params) for name, params in ops]
    mu = centroids.detach().to("cpu", torch.float32).numpy()
    mu_t2 = (-2.0 * mu).T.copy()
    mu_sq = (mu.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)
    neg_half_inv_sigma = np.float32(-0.5 / sigma)

    def assign(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = batch.reshape(len(batch), -1)
        with np.errstate(over="ignore", invalid="ignore"):
            for layer in layers:
                x = layer(x)
        d = x @ mu_t2
        d += mu_sq
        d += (x * x).sum(axis=1, keepdims=True)
        np.maximum(d, 0, out=d)
        labels = d.argmin(axis=1)
        dist = d[np.arange(len(d)), labels]
        s = d * neg_half_inv_sigma
        s -= s.max(axis=1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=1, keepdims=True)
        return labels.astype(np.int64), dist, s

    return assign


def compile_numpy(
    scaler: nn.Module,
    encoder: nn.Module,
    centroids: torch.Tensor,
    sigma: float,
    input_shape: tuple[int, ...],
    reference: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None,
) -> NumpyAssign | None:
    """NumPy (labels, distances, soft) for a batch, or ``None`` when it cannot be trusted.

    ``reference`` (default: the same computation in torch) is what the NumPy version must
    reproduce on random probes: the same labels, distances and soft assignments to 1e-4.
    """
    try:
        fn = _build(scaler, encoder, centroids, sigma, tuple(input_shape))
    except Unsupported as exc:
        log.info("no NumPy fast path (%s); single samples use torch", exc)
        return None
    if reference is None:
        def reference(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            from model.regularisers import sq_distances

            d = sq_distances(encoder(scaler(x)), centroids)
            dist, labels = d.min(dim=1)
            return labels, dist, torch.softmax(d * (-0.5 / sigma), dim=1)

    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for scale in (0.1, 1.0, 3.0, 10.0):
            for _ in range(3):
                probe = torch.randn((1, *input_shape), generator=gen) * scale
                want = [t.cpu().numpy() for t in reference(probe)]
                got = fn(probe.numpy())
                if not (np.array_equal(want[0], got[0])
                        and np.allclose(want[1], got[1], rtol=1e-4, atol=1e-4)
                        and np.allclose(want[2], got[2], rtol=1e-4, atol=1e-5)
                        and all(math.isfinite(float(v)) for v in got[1])):
                    log.warning("NumPy fast path disagrees with torch; single samples use torch")
                    return None
    return fn
