"""Per-thread work arrays of :func:`oclust.model.assign.combination_assignment`, reused across
calls.

The greedy kernel needs six K x N arrays per call; fresh pages for them would cost more than the
kernel's loop, so each thread keeps its buffers (up to :data:`WORK_MAX` entries each) and hands
out views of them.

Example:
    >>> dt, vals, rows, stack, parent, bend = workspace(3, 5)
    >>> dt.shape, stack.shape, parent.shape, workspace(3, 5)[0].base is dt.base
    ((3, 5), (3, 7), (3, 6), True)
"""

from __future__ import annotations

import math
import threading

import numpy as np

__all__ = ["WORK_MAX", "workspace"]

_WORK = threading.local()  # per thread: the buffers, kept for the next call
WORK_MAX = 1 << 21  # entries per work array kept between calls (16 MiB each)


def workspace(n_clusters: int, n: int) -> tuple[np.ndarray, ...]:
    """Work arrays for the kernel: dt, vals (float64 K x N), rows, bend (int64 K x N),
    stack (K x N+2), parent (K x N+1): views of this thread's buffers when they fit."""
    size = n_clusters * (n + 2)
    bufs = getattr(_WORK, "bufs", None)
    if bufs is None or bufs[0].size < size:
        bufs = (np.empty(size), np.empty(size), *(np.empty(size, np.int64) for _ in range(4)))
        if size <= WORK_MAX:
            _WORK.bufs = bufs
    shapes = [(n_clusters, n)] * 3 + [(n_clusters, n + 2), (n_clusters, n + 1), (n_clusters, n)]
    return tuple(b[: math.prod(shp)].reshape(shp) for b, shp in zip(bufs, shapes, strict=True))
