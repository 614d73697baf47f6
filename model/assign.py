"""Combination assignment (CA): the exact greedy batch assignment.

Mahon & Lukasiewicz (AAAI 2024) assign a whole batch with hard labels by repeating N times:
pick the still-unassigned pair (i, k) with the smallest cost

    distances[i, k] + sigma * (log(n_k + 1) - log_prior[k])

(n_k = points already given to cluster k in this batch, starting at 0), assign i -> k and
increment n_k. Ties go to the lowest i, then the lowest k. This module computes exactly the labels
of that naive O(N^2 K) loop without sorting every column: since the penalty is per cluster, a
cluster's best pair is its smallest unassigned distance, so each column is sorted lazily (by
distance, then row) only as deep as the loop reads it; the clusters sit in a heap keyed by their
cached best cost, which only grows, so a cluster is re-examined only when it reaches the top;
late in the batch, when few rows are left, a cluster's best row is found by scanning those rows
instead of sorting deeper. Costs that tie (equal distances, or distinct distances that round to
the same float once the penalty is added) are resolved to the lowest row exactly, and a collapsed
batch (all distances of a cluster equal) costs O(1) per pick. The paper's loss writes the
penalty as ``2*sigma*(...)``: this ``sigma`` is the whole factor, so such a caller passes 2 sigma.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numba
import numpy as np

from oclust.model.validation import check_assignment_inputs

__all__ = ["combination_assignment"]


_INSERTION = 16  # segments this short are insertion-sorted rather than partitioned
_SCAN_FACTOR = 1  # scan the unassigned rows when fewer than a segment to split
_SAMPLES = 32  # rows sampled per column to choose each column's first pivot


@numba.njit(cache=True, nogil=True, inline="always")
def _before(v: float, r: int, w: float, s: int) -> bool:
    """Key order of column entries: by distance, then by row."""
    return v < w or (v == w and r < s)


@numba.njit(cache=True, nogil=True, inline="always")
def _finalize(
    vals: np.ndarray, rows: np.ndarray, stack: np.ndarray, depth: np.ndarray,
    fin: np.ndarray, parent: np.ndarray, bend: np.ndarray, k: int, dt: np.ndarray,
    back: np.ndarray,
) -> None:
    """One step of incremental quicksort on column k: put at least position ``fin[k]`` in place.

    Invariant: positions ``< fin[k]`` hold the column's smallest keys in order; the stack holds
    pivot positions (each already in place, the sentinel n at the bottom), and the segment from
    ``fin[k]`` to the top pivot holds the next smallest keys unsorted. The segment is split
    around median-of-three pivots until it is short, then insertion-sorted; every newly placed
    position gets its union-find root and an unknown block end.
    """
    n = vals.shape[1]
    lo = fin[k]
    hi = stack[k, depth[k] - 1]
    if hi == n and not back[k]:
        # first read past the first pivot (at lo - 1): copy the keys after it out of dt now
        pv, pr, j = vals[k, lo - 1], rows[k, lo - 1], lo
        for i in range(n):
            if _before(pv, pr, dt[k, i], i):
                vals[k, j] = dt[k, i]
                rows[k, j] = i
                j += 1
        back[k] = True
    while hi - lo > _INSERTION:
        # median of three (lo, mid, hi - 1) moved to hi - 1, then a Lomuto partition
        mid = (lo + hi - 1) // 2
        a, b, c = lo, mid, hi - 1
        if _before(vals[k, b], rows[k, b], vals[k, a], rows[k, a]):
            a, b = b, a
        if _before(vals[k, c], rows[k, c], vals[k, b], rows[k, b]):
            b, c = c, b
            if _before(vals[k, b], rows[k, b], vals[k, a], rows[k, a]):
                a, b = b, a
        p = hi - 1
        vals[k, b], vals[k, p] = vals[k, p], vals[k, b]
        rows[k, b], rows[k, p] = rows[k, p], rows[k, b]
        pv, pr = vals[k, p], rows[k, p]
        s = lo
        for j in range(lo, p):
            if _before(vals[k, j], rows[k, j], pv, pr):
                vals[k, s], vals[k, j] = vals[k, j], vals[k, s]
                rows[k, s], rows[k, j] = rows[k, j], rows[k, s]
                s += 1
        vals[k, s], vals[k, p] = vals[k, p], vals[k, s]
        rows[k, s], rows[k, p] = rows[k, p], rows[k, s]
        stack[k, depth[k]] = s
        depth[k] += 1
        hi = s
    for j in range(lo + 1, hi):  # insertion sort of the short segment
        v, r = vals[k, j], rows[k, j]
        q = j - 1
        while q >= lo and _before(v, r, vals[k, q], rows[k, q]):
            vals[k, q + 1] = vals[k, q]
            rows[k, q + 1] = rows[k, q]
            q -= 1
        vals[k, q + 1] = v
        rows[k, q + 1] = r
    depth[k] -= 1  # pop hi: it is in place too
    end = min(hi + 1, n)
    for q in range(lo, end):
        parent[k, q] = q
        bend[k, q] = -1
    fin[k] = end



@numba.njit(cache=True, nogil=True, inline="always")
def _key_less(a: int, b: int, cand_c: np.ndarray, cand_i: np.ndarray) -> bool:
    """Heap order of clusters: by cached cost, then row, then cluster."""
    if cand_c[a] != cand_c[b]:
        return cand_c[a] < cand_c[b]
    if cand_i[a] != cand_i[b]:
        return cand_i[a] < cand_i[b]
    return a < b


@numba.njit(cache=True, nogil=True, inline="always")
def _sift_down(heap: np.ndarray, h: int, cand_c: np.ndarray, cand_i: np.ndarray) -> None:
    """Restore the min-heap below position ``h`` after its key grew."""
    size = heap.shape[0]
    while True:
        m = h
        child = 2 * h + 1
        if child < size and _key_less(heap[child], heap[m], cand_c, cand_i):
            m = child
        if child + 1 < size and _key_less(heap[child + 1], heap[m], cand_c, cand_i):
            m = child + 1
        if m == h:
            return
        heap[h], heap[m] = heap[m], heap[h]
        h = m


@numba.njit(cache=True, nogil=True, inline="always")
def _scan(k: int, pen: float, dt: np.ndarray, left: np.ndarray, n_left: int) -> tuple[float, int]:
    """Cluster k's (cost, row) by a scan of the ``n_left`` unassigned rows ``left[:n_left]``."""
    best_c = 0.0
    best_i = -1
    for j in range(n_left):
        i = left[j]
        c = dt[k, i] + pen
        if best_i < 0 or c < best_c or (c == best_c and i < best_i):
            best_c = c
            best_i = i
    return best_c, best_i


@numba.njit(cache=True, nogil=True, inline="always")
def _candidate(
    k: int, pen: float, vals: np.ndarray, rows: np.ndarray, stack: np.ndarray,
    depth: np.ndarray, fin: np.ndarray, parent: np.ndarray, bend: np.ndarray,
    first: np.ndarray, assigned: np.ndarray, dt: np.ndarray, left: np.ndarray, n_left: int,
    const: np.ndarray, low: np.ndarray, back: np.ndarray,
) -> tuple[float, int]:
    """Cluster k's (cost, row): the lowest unassigned row among those of minimal cost.

    Since fl(d + pen) is monotone in d, the tied entries form a run of equal-distance blocks
    from the column's first unassigned entry (normally a single entry). "First unassigned
    position at or after q" is a path-compressed union-find lookup (``parent``, taken positions
    linked forward when met, the column sorted further when needed), and block ends are cached
    (``bend``), so taken rows are not rescanned even when all distances tie.
    """
    if const[k]:  # every distance equal (a collapsed batch): the lowest unassigned row
        i = low[0]
        while assigned[i]:
            i += 1
        low[0] = i
        return dt[k, i] + pen, i
    n = vals.shape[1]
    best_c = 0.0
    best_i = -1
    q = first[k]
    while True:
        r = q
        while True:
            while parent[k, r] != r:
                r = parent[k, r]
            if r == n or not assigned[rows[k, r]]:
                break
            if r + 1 < n and fin[k] <= r + 1:  # the column must be sorted further
                if n_left * _SCAN_FACTOR < stack[k, depth[k] - 1] - fin[k]:
                    return _scan(k, pen, dt, left, n_left)  # cheaper: scan what is left
                while fin[k] <= r + 1:
                    _finalize(vals, rows, stack, depth, fin, parent, bend, k, dt, back)
            parent[k, r] = r + 1
        while q != r:  # path compression
            nxt = parent[k, q]
            parent[k, q] = r
            q = nxt
        if r == n:
            break
        c = vals[k, r] + pen
        if best_i < 0:
            best_c = c
            best_i = rows[k, r]
            first[k] = r
        elif c != best_c:  # c > best_c, and every later entry costs at least c
            break
        elif rows[k, r] < best_i:
            best_i = rows[k, r]
        e = bend[k, r]
        if e < 0:  # scan to the end of r's block of equal distances, once
            e = r + 1
            while True:
                if e < n and fin[k] <= e:
                    if n_left * _SCAN_FACTOR < stack[k, depth[k] - 1] - fin[k]:
                        return _scan(k, pen, dt, left, n_left)
                    while fin[k] <= e:
                        _finalize(vals, rows, stack, depth, fin, parent, bend, k, dt, back)
                if e == n or vals[k, e] != vals[k, r]:
                    break
                e += 1
            for j in range(r, e):
                bend[k, j] = e
        q = e
        if q == n or vals[k, q] + pen != best_c:
            break  # the next block costs more whether or not its rows are taken
    return best_c, best_i


@numba.njit(cache=True, nogil=True)
def _greedy(
    dt: np.ndarray, log_prior: np.ndarray, sigma: float, target: int, vals: np.ndarray,
    rows: np.ndarray, stack: np.ndarray, parent: np.ndarray, bend: np.ndarray,
) -> np.ndarray:
    """Greedy CA on the costs ``dt`` (K x N: one row per cluster); returns every row's label.

    Every column is sorted lazily by (distance, row) with incremental quicksort
    (:func:`_finalize`), only as deep as the loop reads it. The first split of every column is
    fused with the copy out of ``dt``, around a pivot sampled so that about ``target`` entries
    fall before it; the keys after it are copied only if ever read. Each cluster caches its
    candidate (:func:`_candidate`);
    the clusters sit in a min-heap keyed by the cached (cost, row, cluster). A cached key never
    exceeds the cluster's true one (rows only get taken, penalties only grow), so a top whose
    row is still unassigned is the naive loop's pick; a top whose row was taken is recomputed
    and re-sifted. When the unassigned rows are fewer than the column segment that would
    have to be split next, the candidate is found by scanning those rows instead
    (:func:`_scan`). A column of one repeated distance (a collapsed batch) needs no sorting:
    its candidate is the lowest unassigned row.
    """
    # work arrays, passed in (reused across calls: fresh pages cost more than this loop):
    # vals, rows (K x N) the columns' entries; stack (K x N+2) pivot positions; parent
    # (K x N+1, position n: "none left") the union-find; bend (K x N) block ends, -1: unknown
    n_clusters, n = dt.shape
    depth = np.empty(n_clusters, dtype=np.int64)
    fin = np.zeros(n_clusters, dtype=np.int64)  # positions < fin[k] are sorted and final

    # each column's first pivot: the sample entry of rank ~ target / n among _SAMPLES rows
    n_samp = min(n, _SAMPLES)
    rank = min(n_samp - 1, n_samp * target // n)
    piv_v = np.empty(n_clusters, dtype=np.float64)
    piv_r = np.empty(n_clusters, dtype=np.int64)
    sv = np.empty(n_samp, dtype=np.float64)
    sr = np.empty(n_samp, dtype=np.int64)
    for k in range(n_clusters):
        for s in range(n_samp):  # insertion sort of the sample
            r = s * n // n_samp
            v = dt[k, r]
            q = s - 1
            while q >= 0 and _before(v, r, sv[q], sr[q]):
                sv[q + 1] = sv[q]
                sr[q + 1] = sr[q]
                q -= 1
            sv[q + 1] = v
            sr[q + 1] = r
        piv_v[k] = sv[rank]
        piv_r[k] = sr[rank]
    # one pass per (contiguous) column: the keys before the pivot to the front
    const = np.ones(n_clusters, dtype=np.bool_)  # column of one repeated distance
    back = np.zeros(n_clusters, dtype=np.bool_)  # keys after the first pivot copied yet
    for k in range(n_clusters):
        col, vk, rk = dt[k], vals[k], rows[k]
        pv, pr, first_v = piv_v[k], piv_r[k], dt[k, 0]
        lo, same = 0, True
        for i in range(n):  # the keys after the pivot are copied only if ever read
            v = col[i]
            same &= v == first_v
            if v < pv or (v == pv and i < pr):
                vk[lo] = v
                rk[lo] = i
                lo += 1
        const[k] = same
        vk[lo] = pv
        rk[lo] = pr
        stack[k, 0] = n
        stack[k, 1] = lo
        depth[k] = 2
        parent[k, n] = n
        _finalize(vals, rows, stack, depth, fin, parent, bend, k, dt, back)

    labels = np.full(n, -1, dtype=np.int64)
    assigned = np.zeros(n, dtype=np.bool_)
    counts = np.zeros(n_clusters, dtype=np.int64)
    first = np.zeros(n_clusters, dtype=np.int64)  # every position before first[k] is taken
    cand_c = np.empty(n_clusters, dtype=np.float64)
    cand_i = np.empty(n_clusters, dtype=np.int64)
    low = np.zeros(1, dtype=np.int64)  # every row below low[0] is assigned
    left = np.arange(n, dtype=np.int64)  # left[:n - done]: the unassigned rows, any order
    where = np.arange(n, dtype=np.int64)  # position of each unassigned row in left
    for k in range(n_clusters):
        cand_c[k], cand_i[k] = _candidate(
            k, sigma * (0.0 - log_prior[k]), vals, rows, stack, depth, fin, parent, bend, first,
            assigned, dt, left, n, const, low, back,
        )
    # binary min-heap of the clusters keyed by their cached (cost, row, cluster)
    heap = np.arange(n_clusters, dtype=np.int64)
    for h in range(n_clusters // 2 - 1, -1, -1):
        _sift_down(heap, h, cand_c, cand_i)
    done = 0
    while done < n:
        k = heap[0]
        if not assigned[cand_i[k]]:
            # fresh, and no other key can fall below its cached one: the greedy loop's pick
            i_star = cand_i[k]
            labels[i_star] = k
            assigned[i_star] = True
            counts[k] += 1
            done += 1
            # drop i_star from the unassigned rows (swap with the last)
            last = left[n - done]
            left[where[i_star]] = last
            where[last] = where[i_star]
            if done == n:
                break
        # the top's row was taken, or its penalty just grew: recompute it, then re-sift
        pen = sigma * (math.log(counts[k] + 1.0) - log_prior[k])  # the reference formula
        cand_c[k], cand_i[k] = _candidate(
            k, pen, vals, rows, stack, depth, fin, parent, bend, first, assigned, dt, left,
            n - done, const, low, back,
        )
        _sift_down(heap, 0, cand_c, cand_i)
    return labels


_WORK = threading.local()  # per thread: CA's work arrays, kept for the next call
_WORK_MAX = 1 << 21  # entries per work array kept between calls (16 MiB each)


def _workspace(n_clusters: int, n: int) -> tuple[np.ndarray, ...]:
    """Work arrays for :func:`_greedy`: dt, vals (float64 K x N), rows, bend (int64 K x N),
    stack (K x N+2) and parent (K x N+1), views of this thread's buffers when they fit."""
    size = n_clusters * (n + 2)
    bufs = getattr(_WORK, "bufs", None)
    if bufs is None or bufs[0].size < size:
        bufs = (np.empty(size), np.empty(size), *(np.empty(size, np.int64) for _ in range(4)))
        if size <= _WORK_MAX:
            _WORK.bufs = bufs
    shapes = [(n_clusters, n)] * 3 + [(n_clusters, n + 2), (n_clusters, n + 1), (n_clusters, n)]
    return tuple(b[: math.prod(shp)].reshape(shp) for b, shp in zip(bufs, shapes, strict=True))


def combination_assignment(distances: Any, sigma: float, log_prior: Any = None) -> np.ndarray:
    """Hard labels of a batch by exact greedy combination assignment.

    Repeats N times: pick the still-unassigned pair (i, k) minimising
    ``distances[i, k] + sigma * (log(n_k + 1) - log_prior[k])`` in float64 (``n_k`` = rows
    already given to cluster k, starting at 0; ties go to the lowest i, then the lowest k),
    assign i -> k and increment n_k. The result equals that naive O(N^2 K) loop on every input;
    this implementation runs in at most O(N K log N) compiled code (numba, compiled on the first
    call and cached on disk for later processes).

    Args:
        distances: N x K array of costs (normally squared distances ||z_i - mu_k||^2); a NumPy
            array, a torch tensor on any device (copied to the host once) or a nested sequence.
        sigma: weight of the count/prior penalty, finite and >= 0 (the loss's ``2*sigma``).
            0 gives the row-wise argmin; large values balance the clusters.
        log_prior: length-K log prior probabilities, finite; ``None`` means uniform.

    Returns:
        int64 array of shape (N,): the cluster of every row.

    Raises:
        ValueError: bad input, named (:func:`oclust.model.validation.check_assignment_inputs`).

    Example:
        >>> import numpy as np
        >>> d = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
        >>> combination_assignment(d, sigma=0.0).tolist()
        [0, 0, 0, 0]
        >>> combination_assignment(d, sigma=10.0).tolist()
        [0, 1, 0, 1]
    """
    d, sigma_f, lp = check_assignment_inputs(distances, sigma, log_prior)
    n, n_clusters = d.shape
    if n == 0:
        return np.empty(0, dtype=np.int64)
    # small first fronts: sorting deeper costs more than scanning the rows left (measured)
    dt, vals, rows, stack, parent, bend = _workspace(n_clusters, n)
    np.copyto(dt, d.T)  # K x N, one row per cluster
    return _greedy(dt, lp, sigma_f, max(2 * n // n_clusters, n // 32) + 8, vals, rows, stack,
                   parent, bend)
