"""Live collapse and drift monitoring over a sliding window of recent assignments.

The service records every assignment it answers (hard label and soft assignment vector) and,
when asked (a Prometheus scrape or ``GET /stats``), summarises the most recent ``window``
assignments (ARCHITECTURE.md §1.3):

* ``shares``: the window's hard-label histogram, normalised (exact, unsmoothed);
* ``hard_entropy`` (nats) and ``hard_entropy_ratio`` = hard entropy / log K (1.0 when K = 1);
* ``kl_star`` = KL(shares || prior~), where prior~ is the snapshot's prior mixed with a little
  uniform mass (``prior_smoothing``) so that a zero prior entry can never make it infinite; a
  uniform prior is left exactly unchanged, so there ``kl_star = log K - hard_entropy``;
* ``soft_entropy``: entropy of the mean soft assignment of the window;
* ``drift_js``: Jensen-Shannon divergence (nats, at most log 2) between the window and the
  **reference window, which is the ``window`` assignments just before it** (so drift compares
  the last W assignments with the W before them). It is ``None`` until 2 W assignments were
  recorded.

Recording is cheap (ring-buffer writes under a lock); the statistics are computed on demand.

The monitor also keeps the latents of the last ``map_size`` served points (with their labels)
for the live page's map: :meth:`AssignmentMonitor.latent_map` projects them, and the serving
centroids, onto their first two principal components (:func:`pca_2d`, on request). The ring
restarts when K or the latent size changes; latents of an earlier snapshot with the same shapes
stay until overwritten.
A new model with the same K keeps the window (cluster identities persist while the worker keeps
training the same centroids, and a sudden change then shows up as drift); a model with a
different K starts a fresh window.

Example:
    >>> import numpy as np
    >>> mon = AssignmentMonitor(window=4)
    >>> mon.configure(n_clusters=2, prior=[0.5, 0.5])
    >>> mon.record(np.array([0, 0, 1, 0]), np.array([[0.9, 0.1]] * 4))
    >>> s = mon.stats()
    >>> s.shares, round(s.hard_entropy, 4), round(s.kl_star, 4), s.drift_js
    ([0.75, 0.25], 0.5623, 0.1308, None)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from oclust.model import metrics

__all__ = ["AssignmentMonitor", "LatentMap", "WindowStats", "pca_2d"]


@dataclass(frozen=True)
class WindowStats:
    """The monitor's numbers at one moment; ``None`` where the window is still empty."""

    n_clusters: int
    window: int  # configured window size W
    filled: int  # assignments currently in the window (<= W)
    samples_seen: int  # assignments recorded since the window was (re)started
    counts: list[int]  # hard labels per cluster in the window
    shares: list[float]  # counts / filled (all zeros while empty)
    totals: list[int]  # assignments per cluster since the process started (counters)
    prior: list[float]  # the prior KL* is measured against (after smoothing)
    hard_entropy: float | None
    hard_entropy_ratio: float | None
    soft_entropy: float | None
    kl_star: float | None
    drift_js: float | None
    drift_reference: str = "previous_window"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (no NaN: missing values are ``None``)."""
        return asdict(self)


@dataclass(frozen=True)
class LatentMap:
    """Recent latents projected to 2-D (:meth:`AssignmentMonitor.latent_map`)."""

    capacity: int  # ring size: at most this many points
    latent_dim: int  # m (0 before any latent was recorded)
    points: list[list[float]]  # (n, 2) projections, oldest first
    clusters: list[int]  # (n,) each point's served cluster
    centroids: list[list[float]]  # (K, 2) projected centroids ([] when not comparable)
    explained_variance_ratio: list[float]  # share of the ring's variance on each axis

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)


def pca_2d(
    x: np.ndarray, extra: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project the rows of ``x`` (n, m), and ``extra`` (k, m), onto x's first two principal axes.

    Returns (x projected (n, 2), extra projected (k, 2), explained-variance ratio (2,)). Each
    axis's sign is fixed (its largest loading is positive), so the map does not flip between
    calls; missing axes (m < 2 or n < 2) are zeros.

    Example:
        >>> x = np.array([[0.0, 0, 0], [4, 0, 0], [0, 1, 0], [4, 1, 0]])
        >>> p, c, r = pca_2d(x, np.array([[4.0, 1, 0]]))
        >>> p.round(6).tolist(), c.round(6).tolist(), r.round(3).tolist()
        ([[-2.0, -0.5], [2.0, -0.5], [-2.0, 0.5], [2.0, 0.5]], [[2.0, 0.5]], [0.941, 0.059])
    """
    x = np.asarray(x, dtype=np.float64)
    extra = np.zeros((0, x.shape[1])) if extra is None else np.asarray(extra, dtype=np.float64)
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    axes = np.zeros((2, x.shape[1]))
    ratio = np.zeros(2)
    if len(x) >= 2:
        # principal axes: right singular vectors of the centred data, largest first
        _, sing, vt = np.linalg.svd(x - mean, full_matrices=False)
        r = min(2, len(sing))
        axes[:r] = vt[:r] * np.sign(vt[:r, np.argmax(np.abs(vt[:r]), axis=1)].diagonal())[:, None]
        total = float(np.sum(sing**2))
        if total > 0:
            ratio[:r] = sing[:r] ** 2 / total
    return (x - mean) @ axes.T, (extra - mean) @ axes.T, ratio


def _ring_write(buf: np.ndarray, pos: int, rows: np.ndarray) -> int:
    """Write ``rows`` into the ring ``buf`` starting at ``pos``; return the next position."""
    size = len(buf)
    n = len(rows)
    if n >= size:
        buf[:] = rows[n - size :]
        return 0
    first = min(n, size - pos)
    buf[pos : pos + first] = rows[:first]
    if first < n:
        buf[: n - first] = rows[first:]
    return (pos + n) % size


def _ring_last(buf: np.ndarray, pos: int, count: int, skip: int = 0) -> np.ndarray:
    """The ``count`` entries written before the last ``skip`` ones, oldest first."""
    size = len(buf)
    idx = (pos - skip - count + np.arange(count)) % size
    return buf[idx]


def smooth_prior(prior: Sequence[float] | np.ndarray, smoothing: float) -> np.ndarray:
    """``(1 - smoothing) * prior + smoothing / K``, renormalised; uniform stays uniform.

    Example:
        >>> smooth_prior([1.0, 0.0], 0.1).round(6).tolist()
        [0.95, 0.05]
    """
    p = np.clip(np.asarray(prior, dtype=np.float64), 0.0, None)
    k = len(p)
    total = p.sum()
    p = p / total if total > 0 and np.isfinite(total) else np.full(k, 1.0 / k)
    p = (1.0 - smoothing) * p + smoothing / k
    return p / p.sum()


class AssignmentMonitor:
    """Sliding window of recent hard labels and soft assignments (see the module docstring).

    Args:
        window: W, the number of most recent assignments summarised.
        prior_smoothing: uniform mass mixed into the prior before computing KL* (0 < s < 1).
        map_size: how many recent latents the map keeps (memory: map_size * m float32).

    Thread-safe: ``record`` may be called from the event loop and worker threads at once.

    Example:
        >>> import numpy as np
        >>> mon = AssignmentMonitor(window=10)
        >>> mon.configure(3, [1 / 3] * 3)
        >>> mon.record(np.array([2]), np.array([[0.2, 0.2, 0.6]]))
        >>> mon.stats().counts, mon.stats().totals
        ([0, 0, 1], [0, 0, 1])
    """

    def __init__(
        self, window: int = 1000, prior_smoothing: float = 0.01, map_size: int = 500
    ) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if not isinstance(map_size, int) or map_size < 1:
            raise ValueError(f"map_size must be a positive integer, got {map_size!r}")
        if not 0.0 < prior_smoothing < 1.0:
            raise ValueError(f"prior_smoothing must be in (0, 1), got {prior_smoothing!r}")
        self.window = window
        self.prior_smoothing = prior_smoothing
        self._lock = threading.Lock()
        self._k = 0
        self._prior = np.zeros(0)
        self._totals = np.zeros(0, dtype=np.int64)
        self._labels = np.zeros(0, dtype=np.int64)  # ring of 2W: reference + current window
        self._soft = np.zeros((0, 0))  # ring of W soft rows
        self._label_pos = 0
        self._soft_pos = 0
        self._seen = 0
        self.map_size = map_size
        self._map_z = np.zeros((map_size, 0), dtype=np.float32)  # ring of recent latents
        self._map_labels = np.zeros(map_size, dtype=np.int64)
        self._map_pos = self._map_filled = 0

    @property
    def n_clusters(self) -> int:
        """K of the current configuration (0 before :meth:`configure`)."""
        return self._k

    def configure(self, n_clusters: int, prior: Sequence[float] | np.ndarray) -> None:
        """Adopt a (new) model's K and prior; a different K starts a fresh window.

        Per-cluster totals survive for clusters that still exist, so the counters exported
        from them stay monotonic.
        """
        if n_clusters < 1 or len(prior) != n_clusters:
            raise ValueError(f"need n_clusters >= 1 and a prior of that length, got {n_clusters}")
        smoothed = smooth_prior(prior, self.prior_smoothing)
        with self._lock:
            self._prior = smoothed
            if n_clusters == self._k:
                return
            totals = np.zeros(n_clusters, dtype=np.int64)
            keep = min(n_clusters, self._k)
            totals[:keep] = self._totals[:keep]
            self._totals = totals
            self._k = n_clusters
            self._labels = np.zeros(2 * self.window, dtype=np.int64)
            self._soft = np.zeros((self.window, n_clusters))
            self._label_pos = self._soft_pos = self._seen = 0
            self._map_pos = self._map_filled = 0

    def record(
        self, labels: np.ndarray, soft: np.ndarray, latents: np.ndarray | None = None
    ) -> None:
        """Add assignments: ``labels`` (N,) ints in [0, K), ``soft`` (N, K) rows and optionally
        their ``latents`` (N, m) for the map (only the last ``map_size`` rows are copied).

        Assignments made by a model whose K differs from the configured one (a request that
        was in flight during a swap) are ignored.
        """
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        soft = np.asarray(soft)
        n = len(labels)
        with self._lock:
            if n == 0 or soft.shape != (n, self._k):
                return
            if latents is not None and latents.ndim == 2 and len(latents) == n:
                if latents.shape[1] != self._map_z.shape[1]:  # a new latent size: restart
                    self._map_z = np.zeros((self.map_size, latents.shape[1]), np.float32)
                    self._map_pos = self._map_filled = 0
                if n == 1:  # the common case, one row copy
                    self._map_labels[self._map_pos] = labels[0]
                    self._map_z[self._map_pos] = latents[0]
                    self._map_pos = (self._map_pos + 1) % self.map_size
                else:
                    tail = slice(max(0, n - self.map_size), n)
                    _ring_write(self._map_labels, self._map_pos, labels[tail])
                    self._map_pos = _ring_write(self._map_z, self._map_pos, latents[tail])
                self._map_filled = min(self.map_size, self._map_filled + n)
            if n == 1:
                self._totals[labels[0]] += 1
            else:
                self._totals += np.bincount(labels, minlength=self._k)[: self._k]
            self._label_pos = _ring_write(self._labels, self._label_pos, labels)
            self._soft_pos = _ring_write(self._soft, self._soft_pos, soft)
            self._seen += n

    def latent_map(self, centroids: np.ndarray | None = None) -> LatentMap:
        """The recent latents (finite ones) and ``centroids`` (K, m) projected by :func:`pca_2d`.

        Example:
            >>> mon = AssignmentMonitor(window=4, map_size=3)
            >>> mon.configure(2, [0.5, 0.5])
            >>> z = np.array([[0, 0], [1, 0], [2, 0], [3, 0]], np.float32)
            >>> mon.record(np.array([0, 0, 1, 1]), np.full((4, 2), 0.5), z)
            >>> m = mon.latent_map(np.array([[0.0, 0], [3, 0]]))
            >>> m.points, m.clusters, m.centroids
            ([[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]], [0, 1, 1], [[-2.0, 0.0], [1.0, 0.0]])
        """
        with self._lock:
            count, dim = self._map_filled, self._map_z.shape[1]
            z = _ring_last(self._map_z, self._map_pos, count)
            labels = _ring_last(self._map_labels, self._map_pos, count)
        keep = np.isfinite(z).all(axis=1)
        z, labels = z[keep], labels[keep]
        cents = None
        if centroids is not None and len(z) and np.shape(centroids)[1:] == (dim,):
            cents = centroids
        points, projected, ratio = pca_2d(z, cents)
        return LatentMap(
            capacity=self.map_size,
            latent_dim=dim,
            points=(points.round(4) + 0.0).tolist(),  # + 0.0: no -0.0 in the JSON
            clusters=labels.tolist(),
            centroids=(projected.round(4) + 0.0).tolist(),
            explained_variance_ratio=ratio.round(4).tolist(),
        )

    def stats(self) -> WindowStats:
        """Summarise the current window (see the module docstring for each number)."""
        with self._lock:
            k, w, seen = self._k, self.window, self._seen
            filled = min(seen, w)
            current = _ring_last(self._labels, self._label_pos, filled)
            reference = None
            if seen >= 2 * w:
                reference = _ring_last(self._labels, self._label_pos, w, skip=w)
            soft = self._soft[:filled].copy() if seen < w else self._soft.copy()
            totals = self._totals.tolist()
            prior = self._prior.copy()
        counts = np.bincount(current, minlength=k)[:k] if k else np.zeros(0, dtype=np.int64)
        shares = counts / filled if filled else np.zeros(k)
        hard = soft_h = kl = ratio = drift = None
        if filled:
            hard = metrics.entropy(shares)
            ratio = hard / math.log(k) if k > 1 else 1.0
            kl = metrics.kl_star(shares, prior)
            mean_soft = soft.mean(axis=0)
            soft_h = metrics.entropy(mean_soft / max(mean_soft.sum(), 1e-300))
        if reference is not None:
            ref_shares = np.bincount(reference, minlength=k)[:k] / w
            drift = metrics.js_divergence(shares, ref_shares)
        return WindowStats(
            n_clusters=k,
            window=w,
            filled=filled,
            samples_seen=seen,
            counts=counts.tolist(),
            shares=shares.tolist(),
            totals=totals,
            prior=prior.tolist(),
            hard_entropy=hard,
            hard_entropy_ratio=ratio,
            soft_entropy=soft_h,
            kl_star=kl,
            drift_js=drift,
        )
