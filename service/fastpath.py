"""A compiled path for single-sample inference of MLP encoders (the latency-critical case).

For one sample, torch spends most of its time in per-operator overhead (dispatch, allocation,
autograd bookkeeping), not in arithmetic, and so does NumPy once the network is split into a
few dozen small array calls. :func:`compile_single` lowers a serving pipeline (affine input
scaler -> encoder -> squared distances -> argmin -> softmax) to a small program that one numba
kernel, :func:`_forward`, interprets row by row in float32, when the encoder is built only from
layers it knows (``Linear``, ``ReLU``, ``LayerNorm``, ``BatchNorm1d`` in eval mode,
``Identity``, ``Flatten``, ``Sequential`` and the model's ``MLPEncoder``). The scaler is folded
into the first linear layer, and the result is **checked against the torch pipeline on random
probes**; any mismatch or unknown layer returns ``None`` and the caller keeps using torch.

Example:
    >>> import numpy as np, torch
    >>> from torch import nn
    >>> enc = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> fn = compile_single(nn.Identity(), enc, torch.randn(2, 4), sigma=1.0, input_shape=(3,))
    >>> labels, dist, soft = fn(np.zeros((1, 3), np.float32))
    >>> labels.shape, soft.shape, round(float(soft.sum()), 5)
    ((1,), (1, 2), 1.0)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numba
import numpy as np
import torch
from torch import nn

__all__ = ["SingleAssign", "compile_single"]

log = logging.getLogger(__name__)

SingleAssign = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


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


# opcodes of the program _forward interprets; one row per op:
# (opcode, in_dim, out_dim, offset_a, offset_b, offset_c) into the flat parameter array
LINEAR, RELU, LAYERNORM, AFFINE = 0, 1, 2, 3


@numba.njit(cache=True, nogil=True)
def _forward(
    x: np.ndarray, program: np.ndarray, params: np.ndarray, width: int,
    mu: np.ndarray, neg_half_inv_sigma: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the lowered encoder and the nearest-centroid tail on each row of ``x`` (N, D).

    All arithmetic is float32, as in torch; a non-finite latent gives a NaN distance.
    """
    n, n_clusters = x.shape[0], mu.shape[0]
    labels = np.empty(n, np.int64)
    dist = np.empty(n, np.float32)
    soft = np.empty((n, n_clusters), np.float32)
    d = np.empty(n_clusters, np.float32)
    a = np.empty(width, np.float32)
    b = np.empty(width, np.float32)
    for r in range(n):
        dim = x.shape[1]
        for j in range(dim):
            a[j] = x[r, j]
        for p in range(program.shape[0]):
            op, din, dout = program[p, 0], program[p, 1], program[p, 2]
            o1, o2, o3 = program[p, 3], program[p, 4], program[p, 5]
            if op == LINEAR:  # b = a @ W + bias, W stored (din, dout) row-major at o1
                b[:dout] = np.dot(a[:din], params[o1 : o1 + din * dout].reshape(din, dout))
                for j in range(dout):  # BLAS above: a plain loop here is not vectorised
                    b[j] += params[o2 + j]
                a, b = b, a
                dim = dout
            elif op == RELU:  # NaN stays NaN, as np.maximum and torch.relu
                for j in range(dim):
                    if a[j] < 0:
                        a[j] = 0
            elif op == LAYERNORM:  # eps at o1, weight at o2, bias at o3
                inv_n = np.float32(1.0) / np.float32(dim)
                mean = np.float32(0.0)
                for j in range(dim):
                    mean += a[j]
                mean *= inv_n
                var = np.float32(0.0)
                for j in range(dim):
                    a[j] -= mean
                    var += a[j] * a[j]
                var *= inv_n
                if not np.isfinite(var):
                    var = np.float32(np.nan)  # overflow must surface as NaN, as in torch
                inv = np.float32(1.0) / np.sqrt(var + params[o1])
                for j in range(dim):
                    a[j] = a[j] * inv * params[o2 + j] + params[o3 + j]
            else:  # AFFINE: scale at o1, shift at o2
                for j in range(dim):
                    a[j] = a[j] * params[o1 + j] + params[o2 + j]
        # squared distances to every centroid; the first smallest wins
        best = 0
        finite = True
        for k in range(n_clusters):
            acc = np.float32(0.0)
            for j in range(dim):
                diff = a[j] - mu[k, j]
                acc += diff * diff
            d[k] = acc
            finite = finite and np.isfinite(acc)
            if acc < d[best]:
                best = k
        labels[r] = best
        dist[r] = d[best] if finite else np.float32(np.nan)
        # soft assignment: softmax(-d / (2 sigma)), shifted by its maximum
        top = d[best] * neg_half_inv_sigma
        total = np.float32(0.0)
        for k in range(n_clusters):
            e = np.float32(np.exp(d[k] * neg_half_inv_sigma - top))
            soft[r, k] = e
            total += e
        for k in range(n_clusters):
            soft[r, k] /= total
    return labels, dist, soft


def _program(
    ops: list[tuple[str, tuple[np.ndarray, ...]]], in_dim: int
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(program, flat float32 parameters, widest layer, latent size) for :func:`_forward`."""
    rows: list[list[int]] = []
    chunks: list[np.ndarray] = []
    size = 0

    def put(arr: np.ndarray) -> int:
        nonlocal size
        flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
        chunks.append(flat)
        size += flat.size
        return size - flat.size

    dim = width = in_dim
    for name, params in ops:
        if name == "linear":
            weight, bias = params  # (din, dout)
            if weight.shape[0] != dim:
                raise Unsupported(f"linear layer expects {weight.shape[0]} inputs, gets {dim}")
            rows.append([LINEAR, dim, weight.shape[1], put(weight), put(bias), 0])
            dim = weight.shape[1]
        elif name == "relu":
            rows.append([RELU, dim, dim, 0, 0, 0])
        elif name == "layernorm":
            eps, weight, bias = params
            rows.append([LAYERNORM, dim, dim, put(np.array([eps])), put(weight), put(bias)])
        elif name == "affine":
            scale, shift = params
            rows.append([AFFINE, dim, dim, put(scale), put(shift), 0])
        elif name != "flatten":  # rows are flat already: flatten is a no-op
            raise Unsupported(name)
        width = max(width, dim)
    program = np.array(rows, dtype=np.int64).reshape(-1, 6)
    return program, np.concatenate(chunks) if chunks else np.zeros(0, np.float32), width, dim


def _build(
    scaler: nn.Module, encoder: nn.Module, centroids: torch.Tensor, sigma: float,
    input_shape: tuple[int, ...],
) -> SingleAssign:
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
    in_dim = math.prod(input_shape)
    program, params, width, latent = _program(ops, in_dim)
    mu = np.ascontiguousarray(centroids.detach().to("cpu", torch.float32).numpy())
    if mu.ndim != 2 or mu.shape[1] != latent:
        raise Unsupported(f"centroids of shape {tuple(mu.shape)} for latents of size {latent}")
    neg_half_inv_sigma = float(np.float32(-0.5 / sigma))

    def assign(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(batch, dtype=np.float32).reshape(len(batch), in_dim)
        return _forward(x, program, params, width, mu, neg_half_inv_sigma)

    return assign


def compile_single(
    scaler: nn.Module,
    encoder: nn.Module,
    centroids: torch.Tensor,
    sigma: float,
    input_shape: tuple[int, ...],
    reference: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None,
) -> SingleAssign | None:
    """NumPy (labels, distances, soft) for a batch, or ``None`` when it cannot be trusted.

    ``reference`` (default: the same computation in torch) is what the NumPy version must
    reproduce on random probes: the same labels, distances and soft assignments to 1e-4.
    """
    try:
        fn = _build(scaler, encoder, centroids, sigma, tuple(input_shape))
    except Unsupported as exc:
        log.info("no compiled single-sample path (%s); single samples use torch", exc)
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
                    log.warning("compiled single-sample path disagrees with torch; using torch")
                    return None
    return fn


def warm_up() -> None:
    """Compile the numba kernels (this module's and CA's) now, or load them from numba's cache.

    A fresh install otherwise pays several seconds of compilation when the first snapshot is
    loaded; ``make install`` calls this once so that ``oclust up`` is ready sooner.

    Example:
        >>> warm_up()
    """
    from model.assign import combination_assignment

    x = np.zeros((1, 2), np.float32)
    program, params, width, _ = _program([("linear", (np.ones((2, 2), np.float32),
                                                      np.zeros(2, np.float32)))], 2)
    _forward(x, program, params, width, np.zeros((1, 2), np.float32), -0.5)
    combination_assignment(np.zeros((2, 2)), 1.0)
