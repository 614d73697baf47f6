"""The definition that :func:`oclust.model.assign.combination_assignment` reproduces, in plain code.

The greedy loop of combination assignment, written as directly as possible (pure Python) and
vectorised per step (NumPy): the references the compiled kernel is tested and benchmarked
against. Not used on any hot path.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["reference_assignment", "reference_assignment_vectorised"]


def reference_assignment(
    distances: Any, sigma: float, log_prior: Any = None
) -> np.ndarray:
    """The plain O(N^2 K) greedy loop: the definition :func:`combination_assignment` reproduces.

    Each step scans every unassigned row i (ascending) and every cluster k (ascending) and keeps
    the first strict minimum of ``d + sigma * (log(n_k + 1) - lp[k])``, so ties go to the lowest
    i, then the lowest k. Pure Python, for tests and benchmarks only.

    Example:
        >>> reference_assignment([[0.0, 1.0], [0.0, 1.0]], sigma=10.0).tolist()
        [0, 1]
    """
    d = np.asarray(distances, dtype=np.float64)
    n, n_clusters = d.shape
    lp = [0.0] * n_clusters if log_prior is None else [float(v) for v in log_prior]
    rows = d.tolist()
    counts = [0] * n_clusters
    labels = [-1] * n
    for _ in range(n):
        best_c, best_i, best_k = math.inf, -1, -1
        for i in range(n):
            if labels[i] >= 0:
                continue
            row = rows[i]
            for k in range(n_clusters):
                c = row[k] + sigma * (math.log(counts[k] + 1) - lp[k])
                if best_i < 0 or c < best_c:
                    best_c, best_i, best_k = c, i, k
        labels[best_i] = best_k
        counts[best_k] += 1
    return np.array(labels, dtype=np.int64)


def reference_assignment_vectorised(
    distances: Any, sigma: float, log_prior: Any = None
) -> np.ndarray:
    """The same greedy loop vectorised per step (one N x K cost matrix, row-major argmin: lowest
    i, then lowest k), fast enough to check batches of a benchmark's size (finite input).

    Example:
        >>> reference_assignment_vectorised([[0.0, 1.0], [0.0, 1.0]], sigma=10.0).tolist()
        [0, 1]
    """
    d = np.asarray(distances, dtype=np.float64).copy()
    n, n_clusters = d.shape
    lp = np.zeros(n_clusters) if log_prior is None else np.asarray(log_prior, np.float64)
    counts = np.zeros(n_clusters)
    labels = np.full(n, -1, dtype=np.int64)
    for _ in range(n):
        cost = d + sigma * (np.log(counts + 1.0) - lp)  # the same float64 formula, per column
        i, k = divmod(int(np.argmin(cost)), n_clusters)
        labels[i] = k
        counts[k] += 1
        d[i] = np.inf
    return labels
