"""The training worker: Kafka in, online training, versioned snapshots out (issue 3).

Life of a worker:

1. **Lease** — wait until it holds the namespace's lease (one active trainer per namespace;
   a second worker is a hot standby).
2. **Resume** — load the store's newest snapshot that verifies (if any) and subscribe; each
   partition starts at the group's committed offset, and messages below the snapshot's offset
   for that partition are skipped (the snapshot already contains them; this matters after a
   crash between publishing a snapshot and committing its offsets). A commit beyond the
   snapshot's offset (a fallback past corrupt versions, a rollback) seeks back to it, so
   the messages the snapshot lacks are trained again.
3. **Loop** — fetch, decode/validate (bad messages → ``<topic>.dlq`` with a reason), queue;
   cut batches by size or age (``batch_timeout``), whichever first; ``partial_fit`` runs in a
   thread, pipelined with the next fetch, so heartbeats keep flowing.
4. **Checkpoint** — every ``snapshot_interval`` seconds: publish a snapshot covering exactly
   the trained (or dead-lettered) messages, then commit those offsets. At-least-once: nothing
   is committed that a stored snapshot does not cover. The collapse guard holds publishing
   back while the model is collapsed (and may restore the last healthy weights).
5. **Stop** — SIGTERM/SIGINT: finish the batch, train what is queued, snapshot, commit, exit 0.

Faults (RELIABILITY.md states the guarantees and the tests behind them):

* **Hostile messages** — the decoders raise nothing but ``DecodeError``; anything else a
  message trips is still a dead letter (``decode_failed``), never an exception out of the loop.
* **Crash loops** — before touching a fetch the worker marks in the store, per partition, the
  offsets it holds that no snapshot covers (:class:`~training_worker.lease.ProgressLog`). The
  next holder of the lease reads the mark: one death is replayed as usual; a span that killed
  two holders is taken one message at a time, each marked alone; a message that killed
  ``max_attempts`` holders goes to the DLQ as ``poison`` and is skipped.
* **Offset regressions** — on assignment, a snapshot offset beyond the log's end (confirmed by
  reading its last message back) is a new incarnation of the topic: logged, counted, and
  trained from the start (``offset_regression="reset"``), or the worker halts (``"exit"``).
* **Empty store** — with no snapshot but committed offsets in the group, the worker refuses
  to start a fresh model unless ``allow_fresh``.

Example:
    >>> from training_worker.settings import WorkerSettings
    >>> w = TrainingWorker(WorkerSettings(topic="digits", store="file:///tmp/oclust-doc"))
    >>> w.settings.dlq_topic_name
    'digits.dlq'
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from prometheus_client import CollectorRegistry, Counter, start_http_server
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from model import OnlineClusterer, Snapshot, SnapshotError
from model.priors import parse_prior
from training_worker.batching import SampleQueue
from training_worker.codec import (
    REASONS,
    DecodedBatch,
    DecodeError,
    ReadingDecoder,
    SampleDecoder,
)
from training_worker.kafka import (
    DeadLetters,
    committed_offsets,
    dead_letter_headers,
    ensure_topic,
    offset_exists,
)
from training_worker.lease import Lease, ProgressLog, make_lease, make_progress_log
from training_worker.monitor import CollapseGuard, QualityWindow, WorkerMetrics
from training_worker.settings import WorkerSettings
from training_worker.store import SnapshotStore, StoreError, VersionNotFound, open_store
from training_worker.stream import LocalConsumer, LocalProducer, LocalStream
from training_worker.trainer import Trainer, TrainerHooks
from training_worker.windows import WindowAssembler

__all__ = ["DLQ_REASONS", "FaultMetrics", "FreshStartRefused", "TrainingWorker", "WorkerHalt"]

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 0.2
MAX_STEPS_IN_FLIGHT = 2  # submitted to the training thread ahead of time
RANGE_CRASHES_BEFORE_ISOLATING = 2  # deaths on one span before it is taken one at a time
DLQ_REASONS = (*REASONS, "late_reading", "poison")
T = TypeVar("T")


class WorkerHalt(RuntimeError):
    """A condition the worker must not train through; ``oclust worker`` exits 1 with it."""


class FreshStartRefused(WorkerHalt):
    """The store is empty but the consumer group has committed offsets (see ``allow_fresh``)."""


class FaultMetrics:
    """The worker's fault counters, next to :class:`WorkerMetrics` in the same registry.

    Example:
        >>> m = FaultMetrics(CollectorRegistry())
        >>> m.regressions.labels("beyond_end").inc()
        >>> m.registry.get_sample_value("oclust_worker_offset_regressions_total",
        ...                             {"kind": "beyond_end"})
        1.0
    """

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


def _unreachable(exc: StoreError) -> bool:
    """Whether ``exc`` comes from a connection problem (not from what the store holds)."""
    return isinstance(exc.__cause__, (RedisConnectionError, RedisTimeoutError, OSError))


def _init_training_thread(torch_threads: int | None) -> None:
    """Initializer of the training thread: torch's intra-op threads are set per thread."""
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)


async def _started(
    client: AIOKafkaConsumer | AIOKafkaProducer | LocalConsumer | LocalProducer,
) -> None:
    """Start a Kafka client; on failure close it (no 'unclosed client' noise) and re-raise."""
    try:
        await client.start()
    except BaseException:
        await client.stop()
        raise


class _Rebalance(ConsumerRebalanceListener):
    """Forwards aiokafka's rebalance callbacks to the worker (the only place to commit then)."""

    def __init__(self, worker: TrainingWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.worker._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.worker._on_assigned(set(assigned))


class TrainingWorker:
    """A long-running trainer for one namespace; ``await worker.run()`` until stopped.

    Args:
        settings: the configuration (see :class:`WorkerSettings`).
        store: an open snapshot store (default: ``open_store(settings.store, ...)``).
        metrics: Prometheus metrics (default: a fresh registry).
        hooks: callbacks in the training thread (tests, embedding).
        stream: an in-process :class:`~training_worker.stream.LocalStream` to read instead of
            Kafka (the embedded mode); ``settings.bootstrap_servers`` is then unused.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        store: SnapshotStore | None = None,
        metrics: WorkerMetrics | None = None,
        hooks: TrainerHooks | None = None,
        stream: LocalStream | None = None,
    ) -> None:
        self.settings = settings
        self.stream = stream
        self._store = store
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.hooks = hooks or TrainerHooks()
        self.trainer: Trainer | None = None
        self.metrics_port: int | None = None
        self.last_version: int | None = None
        self._stop: asyncio.Event | None = None
        self._lease_lost: asyncio.Event | None = None
        self._fatal: BaseException | None = None
        for reason in DLQ_REASONS:  # every series exists from the start
            self.metrics.dlq.labels(reason)
        self.faults = FaultMetrics(self.metrics.registry)

    # ------------------------------------------------------------------ public
    @property
    def store(self) -> SnapshotStore:
        """The snapshot store (opened on first use)."""
        if self._store is None:
            s = self.settings
            self._store = open_store(s.store, namespace=s.namespace, keep=s.keep)
        return self._store

    def request_stop(self) -> None:
        """Ask the worker to finish the batch, snapshot, commit and return (signal-safe)."""
        if self._stop is not None:
            self._stop.set()

    async def run(self, handle_signals: bool = False) -> int:
        """Serve until stopped; returns the process exit code (0 on a clean stop)."""
        self._stop = asyncio.Event()
        self._lease_lost = asyncio.Event()
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
        server = self._start_metrics_server()
        lease = make_lease(self.store, self.settings.owner, self.settings.lease_ttl)
        try:
            while not self._stop.is_set():
                if not await self._acquire(lease):
                    break
                self.metrics.active.set(1)
                keeper = asyncio.create_task(self._keep_lease(lease))
                try:
                    await self._serve(lease)
                finally:
                    keeper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await keeper
                    self.metrics.active.set(0)
                    if not self._lease_lost.is_set():
                        await asyncio.to_thread(lease.release)
                if not self._lease_lost.is_set():
                    break
                log.error("lost the lease of namespace %r: back to standby",
                          self.settings.namespace)
                self._lease_lost.clear()
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            if server is not None:
                server.shutdown()
                server.server_close()
        return 0

    # ------------------------------------------------------------------ plumbing
    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("%s received: finishing the batch, then snapshot and commit", sig.name)
        self.request_stop()

    def _start_metrics_server(self) -> Any:
        port = self.settings.metrics_port
        if port < 0:
            return None
        host = self.settings.metrics_host
        server, _thread = start_http_server(port, addr=host, registry=self.metrics.registry)
        self.metrics_port = int(server.server_port)
        log.info("worker metrics on http://%s:%d/metrics", host, self.metrics_port)
        return server

    async def _acquire(self, lease: Lease) -> bool:
        assert self._stop is not None
        announced = unreachable = False
        while not self._stop.is_set():
            try:
                acquired = await asyncio.to_thread(lease.try_acquire)
            except StoreError as exc:  # e.g. Redis not up yet: wait for it
                if not unreachable:
                    log.error("cannot reach the store to take the lease; retrying: %s", exc)
                unreachable, acquired = True, False
            if acquired:
                log.info("holding the lease of namespace %r as %s", self.settings.namespace,
                         lease.owner)
                return True
            elif not announced and not unreachable:
                log.info("standby: namespace %r is trained by %s; waiting for its lease",
                         self.settings.namespace, await asyncio.to_thread(lease.holder))
                announced = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=max(0.05, lease.ttl / 3))
        return False

    async def _keep_lease(self, lease: Lease) -> None:
        assert self._lease_lost is not None
        while True:
            await asyncio.sleep(lease.ttl / 3)  # renewal period, not synchronisation
            if not await asyncio.to_thread(lease.renew):
                self._lease_lost.set()
                return

    # ------------------------------------------------------------------ active phase
    def _load_trainer(self) -> Trainer:
        s = self.settings
        snap = self._current_snapshot()
        guard = CollapseGuard(s.collapse_threshold_nats, s.collapse_patience,
                              window=s.collapse_window, min_window=s.batch_size)
        quality = QualityWindow(s.quality_window, s.max_label_classes,
                                on_ignored=self.faults.labels_ignored.inc)
        if snap is None:
            params: dict[str, Any] = {
                k: v for k, v in {"sigma": s.sigma, "latent_dim": s.latent_dim}.items()
                if v is not None
            }
            model = OnlineClusterer(
                n_clusters=s.n_clusters, regulariser=s.regulariser, lr=s.lr, device=s.device,
                seed=s.seed, encoder=s.encoder, prior=parse_prior(s.prior), **params,
            ).validate_params()
            log.info("no snapshot in %s namespace %r: starting a fresh %r model, K=%d",
                     self.store.url, s.namespace, s.regulariser, s.n_clusters)
        else:
            model = OnlineClusterer.from_snapshot(snap, device=s.device)
            m = snap.meta
            log.info("resuming from snapshot version %d (samples_seen %s, offsets %s)",
                     snap.version, m.samples_seen, m.offsets)
            if (m.n_clusters, m.regulariser) != (s.n_clusters, s.regulariser):
                log.warning("the snapshot's model (K=%s, %s) differs from the settings (K=%d, "
                            "%s): the snapshot wins", m.n_clusters, m.regulariser,
                            s.n_clusters, s.regulariser)
            guard.threshold = (
                s.collapse_threshold if s.collapse_threshold is not None
                else 0.5 * np.log(model.n_clusters)
            )
        return Trainer(model, guard, self.metrics, quality, s.collapse_restore, snap, self.hooks)

    def _current_snapshot(self) -> Snapshot | None:
        store = self.store
        try:
            return store.load()
        except VersionNotFound:
            return None
        except SnapshotError as exc:
            log.error("current snapshot is unusable (%s); trying older versions", exc)
        for v in reversed(store.versions()):
            try:
                return store.load(v)
            except (SnapshotError, VersionNotFound):
                continue
        raise StoreError(f"no usable snapshot in {store.url} namespace {store.namespace!r}; "
                         "roll back to a good version or use a new namespace")

    def _reset_state(self, trainer: Trainer) -> None:
        s = self.settings
        self.trainer = trainer
        self.queue = SampleQueue()
        self.consumed: dict[int, int] = {}
        self.skip_below: dict[int, int] = {}
        self.rewind: dict[int, int] = {}  # partition -> snapshot offset, until the first fetch
        self.inflight: deque[asyncio.Future[Any]] = deque()
        self.lock = asyncio.Lock()
        self.last_checkpoint = time.monotonic()
        self.checkpoint_offsets: dict[str, int] = dict(
            trainer.healthy.meta.offsets if trainer.healthy else {}
        )
        self.messages = 0
        self.dlq_count = 0
        # crash-loop protection: what is in hand per partition, and what a dead holder left
        self.mark_lo: dict[int, int] = {}
        self.marked: dict[str, tuple[int, int]] = {}
        self.isolate: dict[int, tuple[int, int]] = {}
        self.poison: dict[int, int] = {}
        self.progress = make_progress_log(self.store)
        shape = trainer.model.input_shape_ if trainer.model.is_fitted else None
        if s.mode == "samples":
            self.decoder: SampleDecoder | ReadingDecoder = SampleDecoder(
                shape, s.max_message_bytes, s.encoding, s.max_abs_feature
            )
            self.assembler: WindowAssembler | None = None
        else:
            if shape is not None and (len(shape) != 2 or shape[1] != s.window_size):
                raise ValueError(
                    f"the snapshot's model takes samples of shape {shape}, but readings mode "
                    f"with --window-size {s.window_size} makes (channels, {s.window_size})"
                )
            self.decoder = ReadingDecoder(
                shape[0] if shape else None, s.max_message_bytes, s.encoding, s.max_abs_feature
            )
            self.assembler = WindowAssembler(s.window_size, s.window_hop, s.idle_after)

    async def _serve(self, lease: Lease) -> None:
        s = self.settings
        assert self._stop is not None and self._lease_lost is not None
        self.executor = ThreadPoolExecutor(
            1, thread_name_prefix="oclust-train", initializer=_init_training_thread,
            initargs=(s.torch_threads,),
        )
        try:
            await self._serve_with(lease)
        except StoreError as exc:
            # the store went away under an active worker (a progress mark, a load): it cannot
            # prove it holds the lease, so it steps back to standby and waits for the store
            if not (_unreachable(exc) or not await asyncio.to_thread(lease.renew)):
                raise
            log.error("the store is unreachable while active: %s", exc)
            self._lease_lost.set()
        finally:
            self.executor.shutdown(wait=True)

    async def _in_training_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the one thread that owns the model."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, functools.partial(fn, *args)
        )

    async def _serve_with(self, lease: Lease) -> None:
        s = self.settings
        trainer = await self._in_training_thread(self._load_trainer)
        if trainer.healthy is None and not trainer.model.is_fitted:
            await self._refuse_fresh_start()
        self._reset_state(trainer)
        self.lease = lease
        await asyncio.to_thread(self._read_crash_marks, self.progress)
        producer: AIOKafkaProducer | LocalProducer
        consumer: AIOKafkaConsumer | LocalConsumer
        if self.stream is not None:
            producer = self.stream.producer()
        else:
            with contextlib.suppress(KafkaError):
                await ensure_topic(s.bootstrap_servers, s.dlq_topic_name)
            producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, linger_ms=5)
        await _started(producer)
        try:
            if self.stream is not None:
                consumer = self.stream.consumer(s.consumer_group, s.auto_offset_reset)
            else:
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=s.bootstrap_servers, group_id=s.consumer_group,
                    enable_auto_commit=False, auto_offset_reset=s.auto_offset_reset,
                    session_timeout_ms=s.session_timeout_ms,
                    heartbeat_interval_ms=max(100, min(3000, s.session_timeout_ms // 3)),
                    max_partition_fetch_bytes=max(1 << 20, 2 * s.max_message_bytes),
                )
            self.consumer = consumer
            self.dlq = DeadLetters(producer, s.dlq_topic_name)
            consumer.subscribe([s.topic], listener=_Rebalance(self))
            await _started(consumer)
            try:
                await self._loop(consumer)
            finally:
                await consumer.stop()
        finally:
            await producer.stop()

    async def _loop(self, consumer: AIOKafkaConsumer | LocalConsumer) -> None:
        s = self.settings
        assert self._stop is not None and self._lease_lost is not None
        max_records = max(s.batch_size * 4, 1000)
        while not self._stop.is_set() and not self._lease_lost.is_set():
            if self._fatal is not None:
                raise self._fatal
            records = await consumer.getmany(timeout_ms=self._fetch_timeout_ms(),
                                             max_records=max_records)
            async with self.lock:
                if records:
                    await self._ingest(records)
                await self._train_ready(force=False)
                if self._checkpoint_due():
                    await self._checkpoint()
        if self._lease_lost.is_set():
            await self._await_step()
            return  # another worker may own the namespace now: publish nothing
        async with self.lock:
            await self._train_ready(force=True)
            await self._checkpoint(final=True)
            if self.checkpoint_offsets == self._covered_offsets():
                await asyncio.to_thread(self.progress.clear)  # nothing in hand: a clean stop
        assert self.trainer is not None
        log.info("stopped cleanly: %s", self.trainer.describe())

    def _fetch_timeout_ms(self) -> int:
        timeout = FETCH_TIMEOUT_S
        if self.queue.first_at is not None:
            left = self.settings.batch_timeout - (time.monotonic() - self.queue.first_at)
            timeout = min(timeout, max(left, 0.0))
        return int(timeout * 1000)

    # ------------------------------------------------------------------ decode
    async def _ingest(self, records: dict[TopicPartition, list[Any]]) -> None:
        fetched = {tp: self._unseen(tp.partition, msgs) for tp, msgs in records.items()
                   if not self._rewound(tp, msgs)}
        await self._mark({tp.partition: msgs[-1].offset + 1 for tp, msgs in fetched.items()
                          if msgs}, {tp.partition: msgs[0].offset for tp, msgs in fetched.items()
                                     if msgs})
        for tp, msgs in fetched.items():
            if not msgs:
                continue
            self.messages += len(msgs)
            self.metrics.messages.inc(len(msgs))
            for part in self._split_suspects(tp.partition, msgs):
                if part[0].offset == self.poison.get(tp.partition):
                    await self._skip_poison(part[0])
                elif tp.partition in self.isolate and self._suspect(part[0]):
                    await self._ingest_alone(tp, part[0])
                else:
                    await self._ingest_some(tp, part)
            self.consumed[tp.partition] = msgs[-1].offset + 1
            high = self.consumer.highwater(tp)
            if high is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(0, high - msgs[-1].offset - 1))
        if await self.dlq.flush():
            log.debug("dead letters acknowledged")

    async def _ingest_some(self, tp: TopicPartition, msgs: list[Any]) -> None:
        if self.assembler is None:
            await self._ingest_samples(tp, msgs)
        else:
            await self._ingest_readings(tp, msgs)

    async def _refuse_fresh_start(self) -> None:
        """An empty store with committed offsets means the model was lost: do not go back."""
        s = self.settings
        if s.allow_fresh or self.stream is not None:
            return
        try:
            committed = await committed_offsets(s.bootstrap_servers, s.consumer_group, s.topic)
        except KafkaError as exc:
            log.warning("cannot read the group's committed offsets (%s); starting fresh", exc)
            return
        done = {p: o for p, o in committed.items() if o}
        if done:
            raise FreshStartRefused(
                f"the store {self.store.url} namespace {s.namespace!r} holds no snapshot, but "
                f"consumer group {s.consumer_group!r} has committed offsets {done} on topic "
                f"{s.topic!r}: the trained model was lost (an emptied or wrong store?). "
                "Restore the store, or pass --allow-fresh to start a new model from those "
                "offsets (snapshot versions restart at 1)")

    # ------------------------------------------------------------------ crash loops
    def _read_crash_marks(self, progress: ProgressLog) -> None:
        """Turn the mark a dead lease holder left into spans to isolate or messages to skip.

        A span the previous holders died in twice is taken one message at a time, each message
        marked alone; a message that then kills ``max_attempts`` holders is a poison pill: it
        goes to the DLQ (reason ``poison``) and is skipped. A single kill -9 costs nothing but
        the replay (at-least-once).
        """
        topic = self.settings.topic
        for key, (lo, hi) in progress.read().items():
            t, _, p = key.rpartition(":")
            lo = max(lo, int(self.checkpoint_offsets.get(key, lo)))  # the snapshot holds those
            if t != topic or not p.isdigit() or hi <= lo:
                continue
            part = int(p)
            self.faults.crash_recoveries.inc()
            if hi - lo == 1:
                n = progress.bump(f"msg:{key}:{lo}")
                if n >= self.settings.max_attempts:
                    self.poison[part] = lo
                    log.error("%s@%d killed the worker %d times: it goes to the DLQ as poison",
                              key, lo, n)
                    continue
                self.isolate[part] = (lo, hi)
                log.error("%s@%d was in hand when the last worker died (%d of %d attempts): "
                          "retrying it alone", key, lo, n, self.settings.max_attempts)
                continue
            n = progress.bump(f"range:{key}:{lo}")
            if n >= RANGE_CRASHES_BEFORE_ISOLATING:
                self.isolate[part] = (lo, hi)
                log.error("the last %d workers died with %s offsets %d..%d in hand: taking "
                          "them one at a time to find the culprit", n, key, lo, hi - 1)
            else:
                log.warning("the last worker died with %s offsets %d..%d in hand: replaying "
                            "them (at-least-once)", key, lo, hi - 1)

    def _suspect(self, msg: Any) -> bool:
        lo, hi = self.isolate[msg.partition]
        return lo <= msg.offset < hi

    def _split_suspects(self, partition: int, msgs: list[Any]) -> list[list[Any]]:
        """Runs of ordinary messages, with each suspect (or poison) message on its own."""
        if partition not in self.isolate and partition not in self.poison:
            return [msgs]
        out: list[list[Any]] = []
        for m in msgs:
            if self._alone(m) or not out or (len(out[-1]) == 1 and self._alone(out[-1][0])):
                out.append([m])
            else:
                out[-1].append(m)
        return out

    def _alone(self, m: Any) -> bool:
        return m.offset == self.poison.get(m.partition) or (
            m.partition in self.isolate and self._suspect(m))

    async def _ingest_alone(self, tp: TopicPartition, msg: Any) -> None:
        """Decode and train one suspect message by itself, marked alone in the store."""
        await self._await_step()
        await self._train_ready(force=True)
        await asyncio.to_thread(self.progress.mark, {f"{tp.topic}:{tp.partition}":
                                                     (msg.offset, msg.offset + 1)})
        await self._ingest_some(tp, [msg])
        await self._train_ready(force=True)
        self.consumed[tp.partition] = msg.offset + 1
        lo, hi = self.isolate[tp.partition]
        if msg.offset + 1 >= hi:
            del self.isolate[tp.partition]
            log.info("suspect span %s:%d..%d trained without a crash", tp.topic, tp.partition,
                     lo, hi - 1)
        if self.marked:  # the rest of the fetch is in hand again
            await asyncio.to_thread(self.progress.mark, self.marked)

    async def _skip_poison(self, msg: Any) -> None:
        err = DecodeError("poison", f"crashed the worker {self.settings.max_attempts} times")
        await self._dead_letter(msg, err)
        self.faults.poison.inc()
        del self.poison[msg.partition]

    async def _mark(self, his: dict[int, int], firsts: dict[int, int]) -> None:
        """Record in the store what is in hand (since the last snapshot) before touching it."""
        topic = self.settings.topic
        for p, first in firsts.items():
            self.mark_lo.setdefault(p, first)
        ranges = dict(self.marked)
        for p, hi in his.items():
            ranges[f"{topic}:{p}"] = (self.mark_lo[p], hi)
        if ranges != self.marked:
            await asyncio.to_thread(self.progress.mark, ranges)
            self.marked = ranges

    def _rewound(self, tp: TopicPartition, msgs: list[Any]) -> bool:
        """Seek back to the snapshot's offset when an assignment's first fetch starts past it.

        The consumer starts at the group's commit. A snapshot older than the commit (the
        newer versions corrupt, or rolled back) lacks the messages in between: they are
        fetched again and trained, and this fetch is dropped (it comes again after them).
        """
        if not msgs or tp.partition not in self.rewind:
            return False
        target = self.rewind.pop(tp.partition)
        if msgs[0].offset <= target:
            return False
        log.warning("%s:%d: the group committed up to %d but the snapshot holds only the "
                    "messages below %d: training %d..%d again", tp.topic, tp.partition,
                    msgs[0].offset, target, target, msgs[0].offset - 1)
        self.consumer.seek(tp, target)
        return True

    def _unseen(self, partition: int, msgs: list[Any]) -> list[Any]:
        """Drop messages the resumed snapshot already trained on (below its offset)."""
        skip = self.skip_below.get(partition)
        if skip is None or not msgs:
            return msgs
        if msgs[-1].offset + 1 >= skip:
            del self.skip_below[partition]
        self.consumed[partition] = max(self.consumed.get(partition, 0), msgs[-1].offset + 1)
        return [m for m in msgs if m.offset >= skip]

    async def _ingest_samples(self, tp: TopicPartition, msgs: list[Any]) -> None:
        assert isinstance(self.decoder, SampleDecoder)
        try:
            batch = self.decoder.decode_batch([m.value for m in msgs],
                                              [m.headers for m in msgs])
        except Exception:  # the decoder promises DecodeError only; never die on a message
            log.exception("batch decode failed: decoding %d messages one by one", len(msgs))
            batch = self._decode_each(msgs)
        for i, err in batch.rejects:
            await self._dead_letter(msgs[i], err)
        if len(batch.index):
            # one offset per sample: a multi-sample message's rows share its offset
            offsets = np.fromiter((m.offset for m in msgs), np.int64, len(msgs))[batch.index]
            self.queue.put(batch.features, batch.labels, tp.partition, offsets)

    def _decode_each(self, msgs: list[Any]) -> DecodedBatch:
        """One message at a time; any exception is that message's ``decode_failed``."""
        assert isinstance(self.decoder, SampleDecoder)
        feats, labels, index, rejects = [], [], [], []
        for i, m in enumerate(msgs):
            try:
                arr, label = self.decoder.decode(m.value, m.headers)
            except DecodeError as exc:
                rejects.append((i, exc))
            except Exception as exc:
                rejects.append((i, DecodeError("decode_failed", f"{type(exc).__name__}")))
            else:
                feats.append(arr)
                labels.append(label)
                index.append(i)
        shape = self.decoder.shape or (0,)
        return DecodedBatch(np.stack(feats) if feats else np.empty((0, *shape), np.float32),
                            np.asarray(labels, np.int64), np.asarray(index, np.int64), rejects)

    async def _ingest_readings(self, tp: TopicPartition, msgs: list[Any]) -> None:
        assert isinstance(self.decoder, ReadingDecoder) and self.assembler is not None
        windows = []
        for m in msgs:
            try:
                reading = self.decoder.decode(m.value, m.headers, m.key)
                windows += self.assembler.push(reading, (tp.partition, m.offset))
            except DecodeError as err:
                await self._dead_letter(m, err)
            except Exception as exc:
                await self._dead_letter(m, DecodeError("decode_failed", type(exc).__name__))
        if windows:
            self.queue.put_pinned(
                np.stack([w.data for w in windows]),
                np.array([w.label for w in windows], np.int64),
                [w.sources for w in windows],
            )

    async def _dead_letter(self, msg: Any, err: DecodeError) -> None:
        headers = dead_letter_headers(msg.headers, err.reason, err.detail, msg.topic,
                                      msg.partition, msg.offset)
        await self.dlq.send(msg.key, msg.value, headers)
        self.dlq_count += 1
        self.metrics.dlq.labels(err.reason).inc()
        log.warning("dead letter %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, err)

    # ------------------------------------------------------------------ train
    async def _train_ready(self, force: bool) -> None:
        s = self.settings
        while len(self.queue) >= s.batch_size or (len(self.queue) and (force or self._aged())):
            batch = self.queue.take(s.batch_size)
            while len(self.inflight) >= MAX_STEPS_IN_FLIGHT:
                await self.inflight.popleft()
            assert self.trainer is not None
            # the one training thread runs queued steps back to back, without the event loop
            self.inflight.append(asyncio.ensure_future(
                self._in_training_thread(self.trainer.step, batch)))
        if force:
            await self._await_step()

    def _aged(self) -> bool:
        first = self.queue.first_at
        return first is not None and time.monotonic() - first >= self.settings.batch_timeout

    async def _await_step(self) -> None:
        """Wait until every submitted step has run."""
        while self.inflight:
            await self.inflight.popleft()

    # ------------------------------------------------------------------ checkpoint
    def _checkpoint_due(self) -> bool:
        return time.monotonic() - self.last_checkpoint >= self.settings.snapshot_interval

    def _covered_offsets(self) -> dict[str, int]:
        """``{"topic:partition": next offset}`` of everything trained or dead-lettered."""
        topic = self.settings.topic
        waiting = self.queue.pending()
        if self.assembler is not None:
            for p, o in self.assembler.pending().items():
                waiting[p] = min(o, waiting.get(p, o))
        out = dict(self.checkpoint_offsets)
        for p, nxt in self.consumed.items():
            out[f"{topic}:{p}"] = min(nxt, waiting.get(p, nxt))
        return out

    async def _checkpoint(self, final: bool = False) -> None:
        """Publish a snapshot of the trained state, then commit the offsets it covers."""
        await self._await_step()
        self.last_checkpoint = time.monotonic()
        trainer = self.trainer
        assert trainer is not None
        offsets = self._covered_offsets()
        if not trainer.can_snapshot:
            return
        if trainer.steps_since_snapshot == 0 and offsets == self.checkpoint_offsets:
            return  # nothing new
        if not trainer.guard.healthy:
            log.warning("collapse guard: %s snapshot withheld (served hard entropy over the "
                        "recent window below %.3f nats)", "final" if final else "periodic",
                        trainer.guard.threshold)
            return
        extra = {"messages": float(self.messages), "dead_letters": float(self.dlq_count)}
        snap = await self._in_training_thread(trainer.snapshot, offsets, extra)
        if not await asyncio.to_thread(self.lease.renew):
            assert self._lease_lost is not None
            self._lease_lost.set()
            log.error("lease lost before publishing: snapshot dropped")
            return
        try:
            version = await asyncio.to_thread(self.store.publish, snap)
        except StoreError as exc:
            log.error("publishing failed, offsets not committed; retrying at the next "
                      "checkpoint: %s", exc)
            return
        trainer.published(snap.with_version(version))
        self.checkpoint_offsets = offsets
        self.last_version = version
        self.metrics.published.inc()
        self.metrics.version.set(version)
        await self._commit(offsets)
        await asyncio.to_thread(self._after_checkpoint, offsets)
        log.info("published snapshot version %d (samples_seen %d, offsets %s)%s", version,
                 trainer.model.samples_seen_, offsets, " [final]" if final else "")

    def _after_checkpoint(self, offsets: dict[str, int]) -> None:
        """What a snapshot covers is no longer in hand: shrink the mark, drop old counts."""
        topic = self.settings.topic
        ranges = {}
        for p, nxt in self.consumed.items():
            key = f"{topic}:{p}"
            lo = offsets.get(key, self.mark_lo.get(p, nxt))
            self.mark_lo[p] = lo
            if lo < nxt:
                ranges[key] = (lo, nxt)
            self.progress.forget_below(key, lo)
        if ranges != self.marked:
            self.progress.mark(ranges)
            self.marked = ranges

    async def _commit(self, offsets: dict[str, int]) -> None:
        topic = self.settings.topic
        assigned = self.consumer.assignment()
        commit = {}
        for key, off in offsets.items():
            t, _, p = key.rpartition(":")
            tp = TopicPartition(t, int(p))
            if t == topic and tp in assigned:
                commit[tp] = off
        if not commit:
            return
        try:
            await self.consumer.commit(commit)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("offset commit refused (%s); the rebalance listener commits next", exc)

    # ------------------------------------------------------------------ rebalance
    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked or self.trainer is None:
            return
        async with self.lock:
            await self._checkpoint()
            parts = {tp.partition for tp in revoked if tp.topic == self.settings.topic}
            self.queue.forget_partitions(parts)
            if self.assembler is not None:
                self.assembler.forget_partitions(parts)
            for p in parts:
                self.consumed.pop(p, None)
                self.skip_below.pop(p, None)
                self.rewind.pop(p, None)
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    async def _log_bounds(self, tp: TopicPartition) -> tuple[int, int] | None:
        """(log start, log end) of ``tp``, or ``None`` when the broker cannot say."""
        consumer = self.consumer
        if not hasattr(consumer, "beginning_offsets"):
            return None  # the in-process stream never loses or recreates a topic
        try:
            start = (await consumer.beginning_offsets([tp]))[tp]
            end = (await consumer.end_offsets([tp]))[tp]
        except (KafkaError, KeyError, AssertionError) as exc:
            log.warning("cannot read the bounds of %s:%d to check for offset regressions: %s",
                        tp.topic, tp.partition, exc)
            return None
        return int(start), int(end)

    async def _still_there(self, tp: TopicPartition, offset: int) -> bool:
        try:
            return await offset_exists(self.settings.bootstrap_servers, tp, offset)
        except KafkaError as exc:
            log.warning("cannot read %s:%d@%d back (%s): trusting the reported log end",
                        tp.topic, tp.partition, offset, exc)
            return False

    async def _regressed(self, tp: TopicPartition, snap_off: int) -> bool:
        """Check the snapshot's offset against the log; True when it no longer applies.

        Beyond the log end: the topic was recreated (or truncated, or its offsets reset). The
        policy ``reset`` (default) treats it as a new incarnation: train it from its start,
        never skip it; ``exit`` stops the worker. Below the log start: retention deleted
        messages no snapshot holds; they are gone, training goes on from the log start.
        """
        bounds = await self._log_bounds(tp)
        if bounds is None:
            return False
        start, end = bounds
        key = f"{tp.topic}:{tp.partition}"
        if snap_off > end and snap_off > 0 and await self._still_there(tp, snap_off - 1):
            end = snap_off  # the reported end lagged: the snapshot's last message is there
        if snap_off > end:
            self.faults.regressions.labels("beyond_end").inc()
            log.error("offset regression on %s: the snapshot covers up to %d but the log ends "
                      "at %d (recreated topic, truncated log or reset offsets); policy %r",
                      key, snap_off, end, self.settings.offset_regression)
            if self.settings.offset_regression == "exit":
                self._fatal = WorkerHalt(
                    f"offset regression on {key}: snapshot offset {snap_off} > log end {end}; "
                    "restart with --offset-regression reset to train the new log")
                return True
            self.consumer.seek(tp, start)  # a new incarnation: all of it is new
            self.checkpoint_offsets.pop(key, None)
            self.mark_lo[tp.partition] = start
            return True
        if snap_off < start:
            self.faults.regressions.labels("before_start").inc()
            log.error("offset regression on %s: messages %d..%d were deleted from the log "
                      "before any snapshot held them; going on from %d", key, snap_off,
                      start - 1, start)
            if tp.partition in self.rewind:  # seeking back goes no further than the log start
                self.rewind[tp.partition] = start
        return False

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        # Asking the coordinator for committed offsets here would wait on the very rebalance
        # that calls us, so the consumer starts at the committed offsets by itself; _ingest
        # skips what the snapshot already contains (offsets below the snapshot's), and seeks
        # back to the snapshot's offset if the first fetch starts past it (_rewound). Both
        # are set before any await: the consumer fetches while this listener runs.
        ours = {}
        for tp in assigned:
            snap_off = self.checkpoint_offsets.get(f"{tp.topic}:{tp.partition}")
            if snap_off is not None and tp.topic == self.settings.topic:
                ours[tp] = snap_off
                self.skip_below[tp.partition] = snap_off
                if hasattr(self.consumer, "seek"):  # the in-process stream has no seek
                    self.rewind[tp.partition] = snap_off
        skips = {}
        for tp, snap_off in ours.items():
            if await self._regressed(tp, snap_off):
                self.skip_below.pop(tp.partition, None)
                self.rewind.pop(tp.partition, None)
            else:
                skips[tp.partition] = snap_off
        log.info("partitions assigned: %s; starting at the committed offsets, skipping what "
                 "the snapshot covers %s", sorted(tp.partition for tp in assigned), skips)
