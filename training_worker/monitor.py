"""The worker's watchers: the collapse guard, live quality over a window, Prometheus metrics.

Example:
    >>> guard = CollapseGuard(threshold=1.0, patience=2)
    >>> [guard.observe(h) for h in (2.0, 0.5, 0.4)]
    [False, False, True]
    >>> guard.healthy, guard.observe(2.0), guard.healthy, guard.events
    (False, False, True, 1)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from model import metrics as model_metrics

__all__ = ["CollapseGuard", "QualityWindow", "WorkerMetrics"]


class CollapseGuard:
    """Fires when the batch hard entropy stays below ``threshold`` for ``patience`` batches.

    ``healthy`` is true while the latest batch is at or above the threshold; the worker only
    publishes healthy snapshots. ``observe`` returns True exactly on the batch that fires;
    the streak then restarts, so a collapse that persists fires again after ``patience`` more.
    """

    def __init__(self, threshold: float, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.threshold = threshold
        self.patience = patience
        self.streak = 0
        self.events = 0
        self.collapsed = False

    @property
    def healthy(self) -> bool:
        """The latest batch was above the threshold and no collapse is outstanding."""
        return self.streak == 0 and not self.collapsed

    def observe(self, hard_entropy: float) -> bool:
        """Record one batch; True when this batch completes a collapse streak."""
        if hard_entropy >= self.threshold:
            self.streak = 0
            self.collapsed = False
            return False
        self.streak += 1
        if self.streak >= self.patience:
            self.events += 1
            self.collapsed = True
            self.streak = 0
            return True
        return False

    def reset(self) -> None:
        """Forget the current streak (after restoring healthy weights)."""
        self.streak = 0
        self.collapsed = False


class QualityWindow:
    """ACC and NMI of the training labels against message labels over the last ``size`` samples.

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


class WorkerMetrics:
    """The worker's Prometheus metrics in their own registry (names: /tmp/interfaces.md).

    Example:
        >>> m = WorkerMetrics()
        >>> m.samples.inc(3)
        >>> m.registry.get_sample_value("oclust_worker_samples_total")
        3.0
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
        self.loss = Gauge("oclust_worker_loss", "Loss of the last step", registry=r)
        self.hard_entropy = Gauge(
            "oclust_worker_batch_hard_entropy_nats", "Hard-label entropy of the last batch",
            registry=r,
        )
        self.kl_star = Gauge(
            "oclust_worker_batch_kl_star_nats", "KL(batch label histogram || prior)", registry=r
        )
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
            "oclust_worker_collapsed", "1 while the guard holds publishing back", registry=r
        )
        self.acc = Gauge(
            "oclust_worker_window_acc", "ACC of training labels vs message labels (window)",
            registry=r,
        )
        self.nmi = Gauge(
            "oclust_worker_window_nmi", "NMI of training labels vs message labels (window)",
            registry=r,
        )
        self.active = Gauge(
            "oclust_worker_active", "1 while this worker holds the training lease", registry=r
        )
