"""How a worker that took the lease resumes: the model, the fresh-start rule, offset checks.

* :func:`load_trainer` — the store's newest usable snapshot (older ones if the newest is
  broken), or a fresh model from the settings, wrapped in a :class:`Trainer` with its guard.
* :func:`refuse_fresh_start` — an empty store while the consumer group has committed offsets
  means the trained model was lost: the worker halts unless ``allow_fresh``.
* :func:`check_offset` — a snapshot offset beyond the log's end (confirmed by reading its last
  message back) is a new incarnation of the topic: trained from its start
  (``offset_regression="reset"``), or the worker halts (``"exit"``).

Example:
    >>> m = FaultMetrics(CollectorRegistry())
    >>> m.regressions.labels("beyond_end").inc()
    >>> m.registry.get_sample_value("oclust_worker_offset_regressions_total",
    ...                             {"kind": "beyond_end"})
    1.0
"""

from __future__ import annotations

import logging

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter

from oclust.model import OnlineClusterer, Snapshot, SnapshotError
from oclust.model.priors import parse_prior
from oclust.training_worker.kafka import committed_offsets, offset_exists
from oclust.training_worker.monitor import (
    CollapseGuard,
    QualityWindow,
    WorkerMetrics,
    default_threshold,
)
from oclust.training_worker.settings import WorkerSettings, check_threshold
from oclust.training_worker.store import CorruptPointer, SnapshotStore, StoreError, VersionNotFound
from oclust.training_worker.stream import Consumer
from oclust.training_worker.trainer import Trainer, TrainerHooks

__all__ = ["FaultMetrics", "FreshStartRefused", "WorkerHalt", "check_offset", "fresh_model",
           "load_trainer", "refuse_fresh_start"]

log = logging.getLogger(__name__)


class WorkerHalt(RuntimeError):
    """A condition the worker must not train through; ``oclust worker`` exits 1 with it."""


class FreshStartRefused(WorkerHalt):
    """The store is empty but the consumer group has committed offsets (see ``allow_fresh``)."""


class FaultMetrics:
    """The worker's fault counters, next to :class:`WorkerMetrics` in the same registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.regressions = Counter(
            "oclust_worker_offset_regressions",
            "Partitions whose snapshot offset was beyond the log end or before the log start",
            ["kind"], registry=registry,
        )
        for kind in ("beyond_end", "before_start"):
            self.regressions.labels(kind)
        self.poison = Counter(
            "oclust_worker_poison_messages",
            "Messages dead-lettered after crashing the worker max_attempts times",
            registry=registry,
        )
        self.crash_recoveries = Counter(
            "oclust_worker_crash_recoveries",
            "Partitions resumed after the previous lease holder died with messages in hand",
            registry=registry,
        )
        self.labels_ignored = Counter(
            "oclust_worker_quality_labels_ignored",
            "Message labels outside 0..max_label_classes-1, ignored by live quality",
            registry=registry,
        )


def current_snapshot(store: SnapshotStore) -> Snapshot | None:
    """The current snapshot, else the newest usable one (``None``: the store is empty).

    A pointer that names a missing version, a garbled pointer and a corrupt current snapshot
    all fall back to the newest version that loads.
    """
    try:
        return store.load()
    except VersionNotFound as exc:
        if not store.versions():
            return None
        log.error("the current pointer names no stored version (%s); trying older versions", exc)
    except (SnapshotError, CorruptPointer) as exc:
        log.error("current snapshot is unusable (%s); trying older versions", exc)
    for v in reversed(store.versions()):
        try:
            return store.load(v)
        except (SnapshotError, VersionNotFound):
            continue
    raise StoreError(f"no usable snapshot in {store.url} namespace {store.namespace!r}; "
                     "roll back to a good version or use a new namespace")


def fresh_model(settings: WorkerSettings, device: str | None = None) -> OnlineClusterer:
    """A new model from the settings (on ``device``, default ``settings.device``)."""
    s = settings
    return OnlineClusterer(
        n_clusters=s.n_clusters, regulariser=s.regulariser, lr=s.lr, device=device or s.device,
        seed=s.seed, encoder=s.encoder, prior=parse_prior(s.prior), prior_params=s.prior_params,
        **s.model_params,
    ).validate_params()


def load_trainer(settings: WorkerSettings, store: SnapshotStore, metrics: WorkerMetrics,
                 faults: FaultMetrics, hooks: TrainerHooks, device: str | None = None) -> Trainer:
    """The trainer of the store's current snapshot, or of a fresh model (see the module).

    ``device`` overrides ``settings.device`` (a training process's worker keeps a CPU copy).
    """
    s = settings
    snap = current_snapshot(store)
    guard = CollapseGuard(s.collapse_threshold_nats, s.collapse_patience,
                          window=s.collapse_window, min_window=s.batch_size)
    quality = QualityWindow(s.quality_window, s.max_label_classes,
                            on_ignored=faults.labels_ignored.inc)
    if snap is None:
        model = fresh_model(s, device)
        log.info("no snapshot in %s namespace %r: starting a fresh %r model, K=%d",
                 store.url, s.namespace, s.regulariser, s.n_clusters)
    else:
        model = OnlineClusterer.from_snapshot(snap, device=device or s.device)
        m = snap.meta
        log.info("resuming from snapshot version %d (samples_seen %s, offsets %s)",
                 snap.version, m.samples_seen, m.offsets)
        if (m.n_clusters, m.regulariser) != (s.n_clusters, s.regulariser):
            log.warning("the snapshot's model (K=%s, %s) differs from the settings (K=%d, "
                        "%s): the snapshot wins", m.n_clusters, m.regulariser,
                        s.n_clusters, s.regulariser)
        est = model.prior_estimator_
        if s.prior_max_kl is not None and est is None:
            log.warning("the snapshot's prior is not online: --prior online and --prior-max-kl "
                        "apply to a fresh model only")
        elif s.prior_max_kl is not None and est.max_kl != s.prior_max_kl:
            log.warning("the snapshot's online prior keeps its own KL cap %s (--prior-max-kl %s "
                        "applies to a fresh model)", est.max_kl, s.prior_max_kl)
        if s.model_params.get("clip", model.clip) != model.clip:  # --input-clip given, and other
            log.warning("the snapshot's model keeps its own input clip %s (--input-clip %s "
                        "applies to a fresh model)", model.clip, s.input_clip)
        if s.init is not None and s.init != model.init:
            log.warning("the snapshot's model is seeded already (init %s; --init %s applies "
                        "to a fresh model)", model.init, s.init)
        if s.views is not None and s.views != model.views_:
            log.warning("the snapshot's model keeps its own views setting %s (--views %s "
                        "applies to a fresh model)", model.views_, s.views)
        if s.input_guide is not None and s.input_guide != model.input_guide_:
            log.warning("the snapshot's model keeps its own input guide of %d steps "
                        "(--input-guide %d applies to a fresh model)", model.input_guide_,
                        s.input_guide)
    if s.collapse_threshold is None:  # the model's configured prior: a resumed snapshot's wins
        guard.threshold = default_threshold(model.prior, model.n_clusters)
    else:  # checked against the settings' K; a resumed snapshot's K wins
        try:
            check_threshold(s.collapse_threshold, model.n_clusters)
        except ValueError as exc:
            raise WorkerHalt(f"the resumed snapshot's model: {exc}") from None
    return Trainer(model, guard, metrics, quality, s.collapse_restore, snap, hooks)


async def refuse_fresh_start(settings: WorkerSettings, store: SnapshotStore) -> None:
    """An empty store with committed offsets means the model was lost: do not go back.

    Raises:
        FreshStartRefused: the group has committed offsets and ``allow_fresh`` is off.
    """
    s = settings
    if s.allow_fresh:
        return
    try:
        committed = await committed_offsets(s.bootstrap_servers, s.consumer_group, s.topic)
    except KafkaError as exc:  # fail closed: a fresh model could put versions backwards
        raise FreshStartRefused(
            f"Kafka at {s.bootstrap_servers}: cannot check consumer group {s.consumer_group!r} "
            f"for committed offsets ({exc}) while the store {store.url} namespace "
            f"{s.namespace!r} is empty: refusing a fresh model; retry when Kafka answers, or "
            "pass --allow-fresh (OCLUST_ALLOW_FRESH=true) to start one"
        ) from None
    done = {p: o for p, o in committed.items() if o}
    if done:
        raise FreshStartRefused(
            f"the store {store.url} namespace {s.namespace!r} holds no snapshot, but "
            f"consumer group {s.consumer_group!r} has committed offsets {done} on topic "
            f"{s.topic!r}: the trained model was lost (an emptied or wrong store?). "
            "Restore the store, or pass --allow-fresh (OCLUST_ALLOW_FRESH=true) to start a new "
            "model from those offsets (snapshot versions restart at 1)")


async def _log_bounds(consumer: Consumer, tp: TopicPartition) -> tuple[int, int] | None:
    """(log start, log end) of ``tp``, or ``None`` when the broker cannot say."""
    try:
        start = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
    except (KafkaError, KeyError, AssertionError) as exc:
        log.warning("cannot read the bounds of %s:%d to check for offset regressions: %s",
                    tp.topic, tp.partition, exc)
        return None
    return int(start), int(end)


async def _still_there(bootstrap_servers: str, tp: TopicPartition, offset: int) -> bool:
    try:
        return await offset_exists(bootstrap_servers, tp, offset)
    except KafkaError as exc:
        log.warning("cannot read %s:%d@%d back (%s): trusting the reported log end",
                    tp.topic, tp.partition, offset, exc)
        return False


async def check_offset(consumer: Consumer, settings: WorkerSettings, faults: FaultMetrics,
                       tp: TopicPartition, snap_off: int) -> int | None:
    """Check the snapshot's offset against the log; the log start when it no longer applies.

    Beyond the log end: the topic was recreated (or truncated, or its offsets reset). The
    policy ``reset`` (default) treats it as a new incarnation: train it from its start
    (returned), never skip it; ``exit`` raises :class:`WorkerHalt`. Below the log start:
    retention deleted messages no snapshot holds; they are gone, training goes on from the
    log start (returned: a seek to the snapshot's offset would be out of range, which
    ``--auto-offset-reset latest`` answers with the log's end, skipping what is left).
    ``None``: the snapshot's offset still applies.
    """
    bounds = await _log_bounds(consumer, tp)
    if bounds is None:
        return None
    start, end = bounds
    key = f"{tp.topic}:{tp.partition}"
    if snap_off > end and snap_off > 0 and await _still_there(settings.bootstrap_servers, tp,
                                                              snap_off - 1):
        end = snap_off  # the reported end lagged: the snapshot's last message is there
    if snap_off > end:
        faults.regressions.labels("beyond_end").inc()
        log.error("offset regression on %s: the snapshot covers up to %d but the log ends "
                  "at %d (recreated topic, truncated log or reset offsets); policy %r",
                  key, snap_off, end, settings.offset_regression)
        if settings.offset_regression == "exit":
            raise WorkerHalt(
                f"offset regression on {key}: snapshot offset {snap_off} > log end {end}; "
                "restart with --offset-regression reset to train the new log")
        return start
    if snap_off < start:
        faults.regressions.labels("before_start").inc()
        log.error("offset regression on %s: messages %d..%d were deleted from the log "
                  "before any snapshot held them; going on from %d", key, snap_off,
                  start - 1, start)
        return start
    return None
