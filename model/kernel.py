"""The compiled serving kernel for MLP encoders: one numba function, no torch.

For one sample, torch spends most of its time in per-operator overhead, not in arithmetic. Here
the whole serving pipeline (standardise -> linear/ReLU/normalisation layers -> squared distances
to the centroids -> the served rule -> softmax; the latents are an output too) is a small
*program* of rows over one flat float32 parameter array, which :func:`_forward` interprets in
float32, on blocks of rows (one BLAS matrix product per linear layer and block).
:func:`compile_program` builds it from plain NumPy arrays; :mod:`oclust.model.inference` feeds it.

Example:
    >>> import numpy as np
    >>> w = np.eye(3, dtype=np.float32)
    >>> k = compile_program([("linear", (w, np.zeros(3, np.float32)))], 3,
    ...                     centroids=np.eye(3, dtype=np.float32), sigma=1.0)
    >>> labels, dist, soft, z = k(np.array([[0, 2, 0]], np.float32))
    >>> labels.tolist(), dist.tolist(), round(float(soft.sum()), 5), z.tolist()
    ([1], [1.0], 1.0, [[0.0, 2.0, 0.0]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np

__all__ = ["Kernel", "compile_program", "warm_up"]

Op = tuple[str, tuple[np.ndarray, ...]]

# opcodes; one program row per op: (opcode, in_dim, out_dim, offset_a, offset_b, offset_c)
# into the flat parameter array
LINEAR, RELU, LAYERNORM, AFFINE, STANDARDIZE = 0, 1, 2, 3, 4


BLOCK = 128  # rows pushed through each layer together (one matrix product per linear layer)


@numba.njit(cache=True, nogil=True)
def _forward(
    x: np.ndarray, program: np.ndarray, params: np.ndarray, mu: np.ndarray,
    neg_half_inv_sigma: float, head_w: np.ndarray, head_b: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run the program and the served rule on the rows of ``x`` (N, D), a block at a time.

    Returns (labels, distances, soft assignments, latents (N, m)): the latents are the rows the
    program produced, copied out block by block.

    Without a head (``head_w`` of shape (0, 0)) the label is the nearest centroid and the
    logits are -d / (2 sigma); with one, the logits are ``z @ head_w + head_b`` and the label
    is their argmax; the distance is the one to the label's centroid. All arithmetic is float32,
    as in torch; a non-finite latent gives a NaN distance.
    """
    n, n_clusters = x.shape[0], mu.shape[0]
    has_head = head_w.shape[0] > 0
    labels = np.empty(n, np.int64)
    dist = np.empty(n, np.float32)
    soft = np.empty((n, n_clusters), np.float32)
    latents = np.empty((n, mu.shape[1]), np.float32)
    d = np.empty(n_clusters, np.float32)
    logits = np.empty(n_clusters, np.float32)
    d_blk = np.empty((n_clusters, BLOCK), np.float32)  # a block's distances, per centroid
    acc = np.empty(BLOCK, np.float32)  # layer norm: a block's sums, means and 1 / std
    mean = np.empty(BLOCK, np.float32)
    inv = np.empty(BLOCK, np.float32)
    for start in range(0, n, BLOCK):
        rows = min(BLOCK, n - start)
        a = x[start : start + rows].copy()
        dim = a.shape[1]
        for p in range(program.shape[0]):
            op, din, dout = program[p, 0], program[p, 1], program[p, 2]
            o1, o2, o3 = program[p, 3], program[p, 4], program[p, 5]
            if op == LINEAR:  # a @ W + bias, W stored (din, dout) row-major at o1
                a = np.dot(a, params[o1 : o1 + din * dout].reshape(din, dout))
                for i in range(rows):
                    for j in range(dout):
                        a[i, j] += params[o2 + j]
                dim = dout
            elif op == RELU:  # NaN stays NaN, as np.maximum and torch.relu
                for i in range(rows):
                    for j in range(dim):
                        if a[i, j] < 0:
                            a[i, j] = 0
            elif op == LAYERNORM:  # eps at o1, weight at o2, bias at o3
                # on the transposed block, so that the innermost loops run over its rows
                # (vectorised); each row's sums still add its values in order
                inv_n = np.float32(1.0) / np.float32(dim)
                a_t = np.ascontiguousarray(a.T)
                acc[:rows] = 0
                for j in range(dim):
                    for i in range(rows):
                        acc[i] += a_t[j, i]
                for i in range(rows):
                    mean[i] = acc[i] * inv_n
                acc[:rows] = 0
                for j in range(dim):
                    for i in range(rows):
                        a_t[j, i] -= mean[i]
                        acc[i] += a_t[j, i] * a_t[j, i]
                for i in range(rows):
                    var = acc[i] * inv_n
                    if not np.isfinite(var):
                        var = np.float32(np.nan)  # overflow must surface as NaN, as in torch
                    inv[i] = np.float32(1.0) / np.sqrt(var + params[o1])
                for j in range(dim):
                    for i in range(rows):
                        a_t[j, i] = a_t[j, i] * inv[i] * params[o2 + j] + params[o3 + j]
                a = np.ascontiguousarray(a_t.T)
            elif op == AFFINE:  # scale at o1, shift at o2
                for i in range(rows):
                    for j in range(dim):
                        a[i, j] = a[i, j] * params[o1 + j] + params[o2 + j]
            else:  # STANDARDIZE: (a - mean) / std, clipped; mean at o1, std at o2, clip at o3
                c = params[o3]  # inf: no clip; NaN fails both tests and stays NaN, as in torch
                for i in range(rows):
                    for j in range(dim):
                        v = (a[i, j] - params[o1 + j]) / params[o2 + j]
                        if v > c:
                            v = c
                        elif v < -c:
                            v = -c
                        a[i, j] = v
        latents[start : start + rows] = a
        if has_head:  # the method's own rule: logits of a linear head
            head_logits = np.dot(a, head_w)
        # squared distances to every centroid, each summed over j in order; the block is
        # transposed first so that the innermost loop runs over its rows (vectorised)
        a_t = np.ascontiguousarray(a.T)
        for k in range(n_clusters):
            dk = d_blk[k]
            dk[:rows] = 0
            for j in range(dim):
                m = mu[k, j]
                for i in range(rows):
                    diff = a_t[j, i] - m
                    dk[i] += diff * diff
        for i in range(rows):
            r = start + i
            best = 0  # the first smallest wins
            finite = True
            for k in range(n_clusters):
                d[k] = d_blk[k, i]
                finite = finite and np.isfinite(d[k])
                if d[k] < d[best]:
                    best = k
                logits[k] = d[k] * neg_half_inv_sigma
            if has_head:  # label: the argmax of the head's logits (the first largest)
                best = 0
                for k in range(n_clusters):
                    logits[k] = head_logits[i, k] + head_b[k]
                    if logits[k] > logits[best]:
                        best = k
            labels[r] = best
            dist[r] = d[best] if finite else np.float32(np.nan)
            # soft assignment: softmax of the logits, shifted by their maximum
            top = logits[0]
            for k in range(n_clusters):
                top = max(top, logits[k])
            total = np.float32(0.0)
            for k in range(n_clusters):
                e = np.float32(np.exp(logits[k] - top))
                soft[r, k] = e
                total += e
            for k in range(n_clusters):
                soft[r, k] /= total
    return labels, dist, soft, latents


@dataclass(frozen=True, eq=False)
class Kernel:
    """A compiled serving pipeline: call it on a float32 batch (N, *input_shape) for
    (labels int64 (N,), distances float32 (N,), soft float32 (N, K), latents float32 (N, m))."""

    program: np.ndarray
    params: np.ndarray
    in_dim: int
    centroids: np.ndarray
    neg_half_inv_sigma: float
    head_w: np.ndarray
    head_b: np.ndarray

    def __call__(
        self, batch: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(batch, dtype=np.float32).reshape(len(batch), self.in_dim)
        return _forward(x, self.program, self.params, self.centroids, self.neg_half_inv_sigma,
                        self.head_w, self.head_b)


def compile_program(
    ops: Sequence[Op],
    in_dim: int,
    centroids: np.ndarray,
    sigma: float,
    head: tuple[np.ndarray, np.ndarray] | None = None,
) -> Kernel:
    """Lower ``ops`` on flat samples of ``in_dim`` numbers, then centroids (K, m) and the rule.

    Ops: ``("standardize", (mean, std, clip))`` (clip inf: none), ``("linear", (weight (out,
    in), bias))``, ``("relu", ())``, ``("layernorm", (eps,))`` (no affine), ``("batchnorm",
    (running_mean, running_var, [weight, bias,] eps))`` (eval mode; affine with weight and
    bias). ``head``: (weight (K, m), bias (K,)) of a method's own rule. Raises ``ValueError``
    when the shapes do not chain.
    """
    rows: list[list[int]] = []
    chunks: list[np.ndarray] = []
    size = 0

    def put(arr: np.ndarray | float) -> int:
        nonlocal size
        flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
        chunks.append(flat)
        size += flat.size
        return size - flat.size

    dim = int(in_dim)
    for name, p in ops:
        if name == "linear":
            weight, bias = p
            if weight.ndim != 2 or weight.shape[1] != dim or bias.shape != (weight.shape[0],):
                raise ValueError(f"linear layer of shape {weight.shape} on {dim} inputs")
            rows.append([LINEAR, dim, weight.shape[0], put(weight.T), put(bias), 0])
            dim = weight.shape[0]
        elif name == "relu":
            rows.append([RELU, dim, dim, 0, 0, 0])
        elif name == "layernorm":
            ones, zeros = np.ones(dim, np.float32), np.zeros(dim, np.float32)
            rows.append([LAYERNORM, dim, dim, put(p[0]), put(ones), put(zeros)])
        elif name == "batchnorm":  # (x - mean) / sqrt(var + eps) * weight + bias: one affine map
            mean, var, *affine, eps = (np.asarray(v, np.float64) for v in p)
            weight, bias = affine or (np.ones(dim), np.zeros(dim))
            shapes = [v.shape for v in (mean, var, weight, bias)]
            if any(shape != (dim,) for shape in shapes):
                raise ValueError(f"batchnorm of shapes {shapes} (mean, variance, weight, "
                                 f"bias) on {dim} features")
            scale = weight / np.sqrt(var + eps)
            rows.append([AFFINE, dim, dim, put(scale), put(bias - mean * scale), 0])
        elif name == "standardize":
            if np.size(p[0]) != dim or np.size(p[1]) != dim:
                raise ValueError(f"standardize of {np.size(p[0])} means and {np.size(p[1])} "
                                 f"standard deviations on {dim} features")
            rows.append([STANDARDIZE, dim, dim, put(p[0]), put(p[1]), put(p[2])])
        else:
            raise ValueError(f"unknown op {name!r}")
    mu = np.array(centroids, dtype=np.float32, order="C")  # copies: the kernel owns its arrays
    if mu.ndim != 2 or mu.shape[1] != dim:
        raise ValueError(f"centroids of shape {mu.shape} for latents of size {dim}")
    head_w, head_b = np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
    if head is not None:
        if head[0].shape != (mu.shape[0], dim) or head[1].shape != (mu.shape[0],):
            raise ValueError(f"head of shape {head[0].shape} for {mu.shape[0]} clusters")
        head_w = np.array(head[0].T, dtype=np.float32, order="C")
        head_b = np.array(head[1], dtype=np.float32)
    program = np.array(rows, dtype=np.int64).reshape(-1, 6)
    params = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return Kernel(program, params, int(in_dim), mu, float(np.float32(-0.5 / sigma)),
                  head_w, head_b)


def warm_up() -> None:
    """Compile the numba kernels (this module's and CA's) now, or load them from numba's cache.

    A fresh install otherwise pays several seconds of compilation when the first snapshot is
    loaded; ``make install`` calls this once so that ``oclust up`` is ready sooner.

    Example:
        >>> warm_up()
    """
    from oclust.model.assign import combination_assignment

    eye = np.eye(2, dtype=np.float32)
    zero = np.zeros(2, np.float32)
    for head in (None, (eye, zero)):
        compile_program([("linear", (eye, zero))], 2, eye, 1.0, head)(np.zeros((1, 2)))
    combination_assignment(np.zeros((2, 2)), 1.0)
