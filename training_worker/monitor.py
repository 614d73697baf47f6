"""The worker's watchers: the collapse guard, live quality over a window, Prometheus metrics.

Example:
    >>> guard = CollapseGuard(threshold=1.0, patience=2)
    >>> [guard.observe(h) for h in (2.0, 0.5, 0.4)]
    [False, False, True]
    >>> guard.healthy, guard.observe(2.0), guard.healthy, guard.events
    (False, False, False, 1)
    >>> [guard.observe(2.0) for _ in range(2)], guard.healthy  # RECOVERY good ones in a row
    ([False, False], True)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from oclust.model import metrics as model_metrics
from oclust.model.priors import resolve_prior
from oclust.model.snapshot import (
    SAMPLE_HELD,
    SAMPLE_INPUTS,
    Snapshot,
    pack_arrays,
    unpack_arrays,
)
from oclust.model.validation import check_positive

__all__ = ["CollapseGuard", "InputReservoir", "QualityWindow", "WorkerMetrics", "default_threshold"]

PER_CLUSTER = 20  # default guard window: this many samples per cluster (or a batch, if larger)
MIN_PER_CLUSTER = 10  # the smallest window, and the guard abstains until it holds this many
RECOVERY = 3  # judgements in a row at or above the threshold that clear a low one
MIN_SHORT = 8  # an abstaining guard still withholds a collapsed window of at least this many
RESERVOIR_ROWS = 1024  # inputs kept to judge a snapshot before it is published
RESERVOIR_BYTES = 64 << 20  # ... or fewer, when that many would take more memory than this
RESERVOIR_WINDOWS = 100  # the inputs kept span about this many guard windows of recent samples
RESERVOIR_REACH = 50_000  # ... and at most about this many samples (K = 100: not 200,000)
SAMPLE_BYTES = 1 << 20  # the reservoir's inputs stored with a snapshot: at most this many bytes


def default_threshold(prior: object, n_clusters: int) -> float:
    """The guard's default threshold: half the entropy of the *configured* prior, nats.

    ``prior`` as :class:`~oclust.model.OnlineClusterer` takes it. Half of log K for the uniform
    and the online prior (never the online estimate: a collapsing model would pull it, and the
    threshold with it, toward its dominant cluster); a fixed uneven prior lowers it, so a model
    whose served shares follow that prior is not judged collapsed.

    >>> round(default_threshold("online", 4), 3) == round(0.5 * math.log(4), 3)
    True
    >>> round(default_threshold([0.91] + [0.01] * 9, 10), 3)
    0.25
    """
    vector = resolve_prior(prior, n_clusters)[1]
    if vector is None:
        return 0.5 * math.log(n_clusters)
    return 0.5 * model_metrics.entropy(vector)


class CollapseGuard:
    """Judges the *served* labels over a sliding window of recent samples.

    :meth:`observe_labels` folds in the nearest-centroid (served) labels of the samples just
    trained and judges the hard entropy of the window of the last :meth:`window_size` samples
    (``window`` if given, else ``20 K``; never fewer than ``10 K`` or ``min_window``, the batch
    size, since a window of n samples cannot show an entropy above log n). It abstains while
    the window holds fewer than ``max(10 K, min_window)`` samples, so a short batch, first or
    last, never decides anything on its own. ``observe(entropy)`` is the
    judgement itself: it fires when the entropy stays below ``threshold`` for ``patience``
    judged batches in a row, returns True exactly on the batch that fires, and the streak then
    restarts.

    ``healthy`` decides what the worker publishes. It is false from a judgement below the
    threshold until :data:`RECOVERY` judgements in a row at or above it (a collapsed model whose
    entropy peaks for one batch is not published), and while the guard abstains it asks a
    window of n ≥ max(K, :data:`MIN_SHORT`) samples for an entropy of at least
    ``min(threshold, ½ log n)`` (a model never judged, fresh or just restored, is not published
    on a collapsed start; fewer samples than that tell a collapse from luck too rarely).

    Example:
        >>> g = CollapseGuard(threshold=0.5 * math.log(4), patience=2, min_window=8)
        >>> g.window_size(4)
        80
        >>> g.observe_labels(np.arange(64) % 4, 4), round(g.window_entropy(), 3), g.healthy
        (False, 1.386, True)
        >>> [g.observe_labels(np.zeros(40, dtype=int), 4) for _ in range(3)]  # one cluster only
        [False, False, True]
        >>> g.events, g.window_shares()[0]
        (1, 1.0)
    """

    def __init__(
        self,
        threshold: float,
        patience: int,
        window: int | None = None,
        min_window: int = 1,
    ) -> None:
        check_positive(patience=patience, window=window)
        self.threshold = threshold
        self.patience = patience
        self.window = window
        self.min_window = max(int(min_window), 1)
        self.streak = 0
        self.events = 0
        self.collapsed = False
        self.owed = 0  # judgements at or above the threshold still owed since a low one
        self._k = 0
        self._labels: deque[int] = deque(maxlen=1)

    @property
    def healthy(self) -> bool:
        """Publishable: no low judgement left unanswered by :data:`RECOVERY` good ones, no
        collapse outstanding, and, while abstaining, a window not collapsed for its size."""
        if self.owed or self.collapsed:
            return False
        n = len(self._labels)
        if self.judging or n < max(self._k, MIN_SHORT):  # too few to tell a collapse from luck
            return True
        return self.passes(self.window_entropy(), n)

    def passes(self, entropy: float, n: int) -> bool:
        """Whether the hard entropy of ``n`` served labels is healthy where fewer than a
        judged window are at hand: at least min(threshold, ½ log n), since n labels cannot
        show an entropy above log n."""
        return entropy >= min(self.threshold, 0.5 * math.log(n))

    def smallest_window(self, n_clusters: int) -> int:
        """The fewest samples the guard judges: ``10 K``, or ``min_window`` if more."""
        return max(MIN_PER_CLUSTER * n_clusters, self.min_window)

    def window_size(self, n_clusters: int) -> int:
        """Samples judged: ``window`` (default ``20 K``), at least :meth:`smallest_window`.

        >>> CollapseGuard(1.0, 1, window=8, min_window=8).window_size(100)  # 8 cannot show K=100
        1000
        """
        return max(self.window or PER_CLUSTER * n_clusters, self.smallest_window(n_clusters))

    def add(self, labels: np.ndarray, n_clusters: int) -> None:
        """Fold served labels into the window (a new K starts a new window)."""
        size = self.window_size(n_clusters)
        if n_clusters != self._k or self._labels.maxlen != size:
            self._k = n_clusters
            self._labels = deque(maxlen=size)
        self._labels.extend(np.asarray(labels, dtype=np.int64).reshape(-1).tolist())

    def window_shares(self) -> list[float]:
        """Share of each cluster in the window (zeros while it is empty)."""
        if not self._labels:
            return [0.0] * self._k
        lab = np.fromiter(self._labels, np.int64, len(self._labels))
        counts = np.bincount(lab, minlength=self._k)[: self._k]
        return (counts / counts.sum()).tolist()

    def window_entropy(self) -> float:
        """Hard entropy of the window's served labels, nats (NaN while empty)."""
        return model_metrics.entropy(self.window_shares()) if self._labels else math.nan

    @property
    def judging(self) -> bool:
        """The window holds enough samples to be judged."""
        k = self._k
        return bool(k) and len(self._labels) >= self.smallest_window(k)

    def observe_labels(self, labels: np.ndarray, n_clusters: int) -> bool:
        """Fold in one batch's served labels and judge the window; True when the guard fires."""
        self.add(labels, n_clusters)
        if not self.judging:
            return False
        return self.observe(self.window_entropy())

    def observe(self, hard_entropy: float) -> bool:
        """Record one judgement; True when it completes a collapse streak."""
        if hard_entropy >= self.threshold:
            self.streak = 0
            self.owed = max(self.owed - 1, 0)
            self.collapsed = self.collapsed and self.owed > 0
            return False
        self.streak += 1
        self.owed = RECOVERY
        if self.streak >= self.patience:
            self.events += 1
            self.collapsed = True
            self.streak = 0
            return True
        return False

    def reset(self) -> None:
        """Forget the current streak and the window (after restoring healthy weights), and
        withhold until a judgement of the restored weights is at or above the threshold: they
        collapsed on this stream before, so they are not published again unjudged."""
        self.streak = 0
        self.owed = 1
        self.collapsed = False
        self._labels.clear()


def _rows_within(max_bytes: int, row: np.ndarray) -> int:
    """How many rows the size of ``row`` fit in ``max_bytes`` (at least one)."""
    return max(max_bytes // max(row.nbytes, 1), 1)


class InputReservoir:
    """A random sample of the recent inputs, reaching further back than the guard's window.

    Each input trained on replaces a random kept one with probability ``rows / horizon`` (once
    ``rows`` are kept), so the sample spans about the last ``horizon`` inputs: an input ``a``
    inputs old is still there with probability about exp(−a / horizon). A burst of b inputs
    fills about 1 − exp(−b / horizon) of it, and a lasting change of the stream takes it over
    at the same rate. Draws come from ``seed``: the same inputs, the same sample.

    The worker judges a snapshot on it before publishing (:meth:`Trainer.publishable
    <oclust.training_worker.trainer.Trainer.publishable>`): a model that learned a burst of
    outliers can serve the burst's own inputs well spread, which is all the guard's window
    sees, while it serves the stream's usual inputs to one cluster.

    Example:
        >>> r = InputReservoir(rows=4, horizon=8)
        >>> r.add(np.arange(4, dtype=np.float32).reshape(4, 1))
        >>> len(r), r.inputs().ravel().tolist()  # the first 4 fill it
        (4, [0.0, 1.0, 2.0, 3.0])
        >>> r.add(np.full((1000, 1), 9.0, np.float32)); len(r), set(r.inputs().ravel().tolist())
        (4, {9.0})
    """

    def __init__(self, rows: int = RESERVOIR_ROWS, horizon: int = RESERVOIR_ROWS,
                 seed: int = 0) -> None:
        check_positive(rows=rows, horizon=horizon)
        self.rows = rows
        self.horizon = horizon
        self.seed = seed
        self._kept: np.ndarray | None = None
        self._n = 0
        self._rng: np.random.Generator | None = None
        self.offered = 0  # inputs offered to :meth:`add` so far
        self._stands_for = 0  # inputs a resumed subset stands for (what the stored sample held)

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        """Inputs it can keep: ``rows``, or fewer where that many would exceed
        :data:`RESERVOIR_BYTES` (known once the first batch has shown the input size)."""
        return self.rows if self._kept is None else len(self._kept)

    def add(self, x: np.ndarray) -> None:
        """Offer a batch of inputs (N, ...); a new per-sample shape starts a new sample."""
        x = np.asarray(x, dtype=np.float32)
        if not len(x):
            return
        self.offered += len(x)
        if self._kept is None or self._kept.shape[1:] != x.shape[1:]:
            self._start(x.shape[1:], min(self.rows, _rows_within(RESERVOIR_BYTES, x[0])))
        room = min(len(self._kept) - self._n, len(x))
        self._kept[self._n : self._n + room] = x[:room]
        self._n += room
        rest = x[room:]
        if not len(rest):
            return
        assert self._rng is not None
        chance = min(len(self._kept) / self.horizon, 1.0)
        taken = rest[self._rng.random(len(rest)) < chance]
        self._kept[self._rng.integers(0, len(self._kept), len(taken))] = taken

    def _start(self, row_shape: tuple[int, ...], rows: int) -> None:
        """Start an empty sample of ``rows`` inputs of ``row_shape``, drawing from ``seed``."""
        self._kept = np.empty((rows, *row_shape), np.float32)
        self._n = self._stands_for = 0
        self._rng = np.random.default_rng(self.seed)

    def inputs(self) -> np.ndarray:
        """The kept inputs (a copy), (n, ...)."""
        if self._kept is None:
            return np.empty((0,), np.float32)
        return self._kept[: self._n].copy()

    def sample(self, max_bytes: int = SAMPLE_BYTES) -> np.ndarray:
        """The kept inputs to store with a snapshot: all of them, or a random subset of them
        that fits ``max_bytes`` (at least one row); :meth:`resume` takes it back."""
        x = self.inputs()
        fit = _rows_within(max_bytes, x[0]) if len(x) else 0
        if len(x) <= fit:
            return x
        picked = np.random.default_rng(self.seed).choice(len(x), fit, replace=False)
        return x[np.sort(picked)]

    def resume(self, stored: np.ndarray, held: int) -> None:
        """Start from a sample stored with a snapshot, where the reservoir held ``held`` inputs.
        A worker resumed from that snapshot then judges on the stream it trained on, not only
        on what it reads next: restarted during a burst, it would otherwise fill an empty
        reservoir with the burst alone and publish the burst's model.

        Where :meth:`sample` kept a subset (large inputs), the reservoir becomes that subset,
        full: no row twice (repeated rows would read as a collapse, and compound over
        restarts), and a burst replaces the same share of it as of the larger one.

        >>> r = InputReservoir(rows=8, horizon=80)
        >>> r.resume(np.zeros((5, 3), np.float32), held=5)
        >>> len(r), r.capacity
        (5, 8)
        >>> r.resume(np.zeros((2, 3), np.float32), held=5)  # a subset of the 5 it held
        >>> len(r), r.capacity
        (2, 2)
        """
        stored = np.asarray(stored, dtype=np.float32)
        if not len(stored):
            return
        subset = int(held) > len(stored)
        rows = len(stored) if subset else min(self.rows, _rows_within(RESERVOIR_BYTES, stored[0]))
        self._start(stored.shape[1:], rows)
        self._n = min(len(stored), rows)
        self._kept[: self._n] = stored[: self._n]
        self._stands_for = int(held) if subset else 0

    def store_in(self, snapshot: Snapshot, min_rows: int = 1) -> Snapshot:
        """``snapshot`` with :meth:`sample` stored in its weights (``sample.inputs``, and
        ``sample.held``: how many inputs it stands for), for :meth:`resume_from`; unchanged while
        empty, or when fewer than ``min_rows`` fit :data:`SAMPLE_BYTES` (too few to judge on)."""
        stored = self.sample()
        if len(stored) < max(min_rows, 1):
            return snapshot
        arrays = unpack_arrays(snapshot.weights)
        arrays[SAMPLE_INPUTS] = stored
        arrays[SAMPLE_HELD] = np.array([max(len(self), self._stands_for)], np.int64)
        return Snapshot.create(pack_arrays(arrays), snapshot.manifest)

    def resume_from(self, snapshot: Snapshot, input_shape: tuple[int, ...],
                    min_rows: int = 1) -> str | None:
        """:meth:`resume` from the sample :meth:`store_in` stored in ``snapshot``, if it holds
        one of per-sample shape ``input_shape``, and, where it is a subset (:meth:`resume` then
        keeps it as the whole sample), at least ``min_rows`` rows: a smaller one would leave
        too few to judge on for good. Returns why a stored sample was not used (``None``: used,
        or there was none).

        >>> r = InputReservoir(rows=8)
        >>> r.add(np.ones((5, 2), np.float32))
        >>> snap = r.store_in(Snapshot.create(pack_arrays({"w": np.zeros(1, np.float32)}), {}))
        >>> back = InputReservoir(rows=8)
        >>> back.resume_from(snap, (2,)), len(back), back.resume_from(snap, (3,))
        (None, 5, 'float32 inputs of shape (5, 2) for a model of per-sample shape (3,)')
        """
        arrays = unpack_arrays(snapshot.weights)
        stored, held = arrays.get(SAMPLE_INPUTS), arrays.get(SAMPLE_HELD)
        if stored is None or held is None:
            return None
        if stored.dtype != np.float32 or stored.ndim < 1 or stored.shape[1:] != tuple(input_shape):
            return (f"{stored.dtype} inputs of shape {stored.shape} for a model of per-sample "
                    f"shape {tuple(input_shape)}")
        if held.dtype.kind not in "iu" or held.size != 1 or int(held.reshape(-1)[0]) < 0:
            return f"a held count of {held.dtype} {held.reshape(-1)[:2].tolist()}"
        if not np.isfinite(stored).all():
            return "NaN or infinite inputs"
        count = int(held.reshape(-1)[0])
        if count > len(stored) and len(stored) < min_rows:
            return f"{len(stored)} rows stored, {min_rows} needed to judge on"
        self.resume(stored, count)
        return None


class QualityWindow:
    """ACC and NMI of the served labels against message labels over the last ``size`` samples.

    Labels outside ``0..max_classes-1`` are ignored for quality (a hostile label must not
    make the Hungarian matching build a huge matrix) and counted in ``ignored`` and, when
    given, ``on_ignored(n)``.

    Example:
        >>> q = QualityWindow(size=4, max_classes=10)
        >>> q.add(np.array([0, 0, 1, 1, 10**9]), np.array([1, 1, 0, 0, 0]))
        >>> q.scores(), q.ignored
        ({'acc': 1.0, 'nmi': 1.0}, 1)
    """

    def __init__(
        self, size: int = 2000, max_classes: int = 1024,
        on_ignored: Callable[[int], object] | None = None,
    ) -> None:
        self.size = size
        self.max_classes = max_classes
        self.on_ignored = on_ignored
        self.ignored = 0
        self._true: deque[int] = deque(maxlen=size)
        self._pred: deque[int] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._true)

    def add(self, y_true: np.ndarray, y_pred: np.ndarray) -> None:
        """Add the labelled samples of a batch (``y_true < 0``: unlabelled, skipped)."""
        y_true = np.asarray(y_true)
        mask = y_true >= 0
        wild = mask & (y_true >= self.max_classes)
        if wild.any():
            n = int(wild.sum())
            self.ignored += n
            if self.on_ignored is not None:
                self.on_ignored(n)
            mask &= ~wild
        if mask.any():
            self._true.extend(np.asarray(y_true)[mask].tolist())
            self._pred.extend(np.asarray(y_pred)[mask].tolist())

    def scores(self) -> dict[str, float]:
        """``{"acc", "nmi"}`` over the window; empty when fewer than two labelled samples."""
        if len(self._true) < 2:
            return {}
        t, p = np.fromiter(self._true, np.int64), np.fromiter(self._pred, np.int64)
        return {
            "acc": float(model_metrics.cluster_acc(t, p)),
            "nmi": float(model_metrics.nmi(t, p)),
        }


def _undefined(gauge: Gauge) -> Gauge:
    """``gauge`` set to NaN: undefined until the first step sets it (0 would read as a
    collapse, or a perfect loss), as the service exports its own undefined figures."""
    gauge.set(math.nan)
    return gauge


def _collapse_gauges(source: str, labels: str, r: CollectorRegistry) -> tuple[Gauge, Gauge]:
    """The hard-label entropy and KL* gauges of one source of labels (served or training)."""
    name = f"oclust_worker_{source}"
    return (_undefined(Gauge(f"{name}_hard_entropy_nats", f"Entropy of {labels}", registry=r)),
            _undefined(Gauge(f"{name}_kl_star_nats", f"KL(shares of {labels} || prior)",
                             registry=r)))


class WorkerMetrics:
    """The worker's Prometheus metrics in their own registry (the README lists them).

    Example:
        >>> m = WorkerMetrics()
        >>> m.samples.inc(3)
        >>> m.registry.get_sample_value("oclust_worker_samples_total")
        3.0
        >>> m.registry.get_sample_value("oclust_worker_served_hard_entropy_nats")  # no data yet
        nan
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.samples = Counter("oclust_worker_samples", "Samples trained on", registry=r)
        self.batches = Counter("oclust_worker_batches", "Training steps taken", registry=r)
        self.messages = Counter(
            "oclust_worker_messages", "Kafka messages consumed", registry=r
        )
        self.step_seconds = Histogram(
            "oclust_worker_step_seconds", "Seconds per partial_fit step", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.refused = Counter(
            "oclust_worker_refused_batches", "Batches the model refused (skipped, logged)",
            registry=r,
        )
        self.loss = _undefined(Gauge("oclust_worker_loss", "Loss of the last step", registry=r))
        self.served_hard_entropy, self.served_kl_star = _collapse_gauges(
            "served", "the served (nearest-centroid) labels over the guard's window of recent "
            "samples: what the collapse guard judges", r)
        self.train_hard_entropy, self.train_kl_star = _collapse_gauges(
            "train", "the regulariser's training labels of the last batch (CA and SK keep them "
            "balanced by construction: a gap to the served figures is a warning sign)", r)
        self.lag = Gauge(
            "oclust_worker_consumer_lag", "High watermark minus position", ["partition"],
            registry=r,
        )
        self.dlq = Counter(
            "oclust_worker_dlq_messages", "Messages sent to the dead-letter topic", ["reason"],
            registry=r,
        )
        self.published = Counter(
            "oclust_worker_snapshots_published", "Snapshots published to the store", registry=r
        )
        self.version = Gauge(
            "oclust_worker_snapshot_version", "Version of the last published snapshot", registry=r
        )
        self.collapse_events = Counter(
            "oclust_worker_collapse_events", "Times the collapse guard fired", registry=r
        )
        self.collapsed = Gauge(
            "oclust_worker_collapsed", "1 while the guard holds publishing back (not healthy, "
            "or the snapshot judged on older inputs serves them collapsed)", registry=r,
        )
        self.reservoir_hard_entropy = _undefined(Gauge(
            "oclust_worker_reservoir_hard_entropy_nats",
            "Entropy of the labels the last snapshot judged for publishing serves to a random "
            "sample of older inputs (about the last 100 guard windows)", registry=r,
        ))
        self.acc = _undefined(Gauge(
            "oclust_worker_window_acc", "ACC of served labels vs message labels (window)",
            registry=r,
        ))
        self.nmi = _undefined(Gauge(
            "oclust_worker_window_nmi", "NMI of served labels vs message labels (window)",
            registry=r,
        ))
        self.active = Gauge(
            "oclust_worker_active", "1 while this worker holds the training lease", registry=r
        )
