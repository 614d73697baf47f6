"""The training worker: Kafka in, online training, versioned snapshots out (issue 3).

Life of a worker:

1. **Lease** — wait until it holds the namespace's lease (one active trainer per namespace;
   a second worker is a hot standby).
2. **Resume** — load the store's current snapshot (if any) and subscribe; each partition
   starts at the group's committed offset, and messages below the snapshot's offset for that
   partition are skipped (the snapshot already contains them; this matters after a crash
   between publishing a snapshot and committing its offsets).
3. **Loop** — fetch, decode/validate (bad messages → ``<topic>.dlq`` with a reason), queue;
   cut batches by size or age (``batch_timeout``), whichever first; ``partial_fit`` runs in a
   thread, pipelined with the next fetch, so heartbeats keep flowing.
4. **Checkpoint** — every ``snapshot_interval`` seconds: publish a snapshot covering exactly
   the trained (or dead-lettered) messages, then commit those offsets. At-least-once: nothing
   is committed that a stored snapshot does not cover. The collapse guard holds publishing
   back while the model is collapsed (and may restore the last healthy weights).
5. **Stop** — SIGTERM/SIGINT: finish the batch, train what is queued, snapshot, commit, exit 0.

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
from prometheus_client import start_http_server

from model import OnlineClusterer, Snapshot, SnapshotError
from model.priors import parse_prior
from training_worker.batching import SampleQueue
from training_worker.codec import DecodeError, ReadingDecoder, SampleDecoder
from training_worker.kafka import DeadLetters, dead_letter_headers, ensure_topic
from training_worker.lease import Lease, make_lease
from training_worker.monitor import CollapseGuard, QualityWindow, WorkerMetrics
from training_worker.settings import WorkerSettings
from training_worker.store import SnapshotStore, StoreError, VersionNotFound, open_store
from training_worker.stream import LocalConsumer, LocalProducer, LocalStream
from training_worker.trainer import Trainer, TrainerHooks
from training_worker.windows import WindowAssembler

__all__ = ["TrainingWorker"]

log = logging.getLogger("oclust.worker")

FETCH_TIMEOUT_S = 0.2
MAX_STEPS_IN_FLIGHT = 2  # submitted to the training thread ahead of time
T = TypeVar("T")


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
        server, _thread = start_http_server(port, addr="0.0.0.0", registry=self.metrics.registry)
        self.metrics_port = int(server.server_port)
        log.info("worker metrics on http://0.0.0.0:%d/metrics", self.metrics_port)
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
        guard = CollapseGuard(s.collapse_threshold_nats, s.collapse_patience)
        quality = QualityWindow(s.quality_window)
        if snap is None:
            params: dict[str, Any] = {
                k: v for k, v in {"sigma": s.sigma, "latent_dim": s.latent_dim}.items()
                if v is not None
            }
            model = OnlineClusterer(
                n_clusters=s.n_clusters, regulariser=s.regulariser, lr=s.lr, device=s.device,
                seed=s.seed, encoder=s.encoder, prior=parse_prior(s.prior), **params,
            )
            log.info("no snapshot in %s namespace %r: starting a fresh %r model, K=%d",
                     self.store.url, s.namespace, s.regulariser, s.n_clusters)
        else:
            model = OnlineClusterer.from_snapshot(snap, device=s.device)
            m = snap.manifest
            log.info("resuming from snapshot version %d (samples_seen %s, offsets %s)",
                     snap.version, m.get("samples_seen"), m.get("offsets"))
            if (m.get("n_clusters"), m.get("regulariser")) != (s.n_clusters, s.regulariser):
                log.warning("the snapshot's model (K=%s, %s) differs from the settings (K=%d, "
                            "%s): the snapshot wins", m.get("n_clusters"), m.get("regulariser"),
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
        self.inflight: deque[asyncio.Future[Any]] = deque()
        self.lock = asyncio.Lock()
        self.last_checkpoint = time.monotonic()
        self.checkpoint_offsets: dict[str, int] = dict(
            (trainer.healthy.manifest.get("offsets") or {}) if trainer.healthy else {}
        )
        self.messages = 0
        self.dlq_count = 0
        shape = trainer.model.input_shape_ if trainer.model.is_fitted else None
        if s.mode == "samples":
            self.decoder: SampleDecoder | ReadingDecoder = SampleDecoder(
                shape, s.max_message_bytes, s.encoding
            )
            self.assembler: WindowAssembler | None = None
        else:
            if shape is not None and (len(shape) != 2 or shape[1] != s.window_size):
                raise ValueError(
                    f"the snapshot's model takes samples of shape {shape}, but readings mode "
                    f"with --window-size {s.window_size} makes (channels, {s.window_size})"
                )
            self.decoder = ReadingDecoder(
                shape[0] if shape else None, s.max_message_bytes, s.encoding
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
        finally:
            self.executor.shutdown(wait=True)

    async def _in_training_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the one thread that owns the model."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, functools.partial(fn, *args)
        )

    async def _serve_with(self, lease: Lease) -> None:
        s = self.settings
        self._reset_state(await self._in_training_thread(self._load_trainer))
        self.lease = lease
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
        for tp, all_msgs in records.items():
            msgs = self._unseen(tp.partition, all_msgs)
            if not msgs:
                continue
            self.messages += len(msgs)
            self.metrics.messages.inc(len(msgs))
            if self.assembler is None:
                await self._ingest_samples(tp, msgs)
            else:
                await self._ingest_readings(tp, msgs)
            self.consumed[tp.partition] = msgs[-1].offset + 1
            high = self.consumer.highwater(tp)
            if high is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(0, high - msgs[-1].offset - 1))
        if await self.dlq.flush():
            log.debug("dead letters acknowledged")

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
        batch = self.decoder.decode_batch([m.value for m in msgs], [m.headers for m in msgs])
        for i, err in batch.rejects:
            await self._dead_letter(msgs[i], err)
        if len(batch.index):
            # one offset per sample: a multi-sample message's rows share its offset
            offsets = np.fromiter((m.offset for m in msgs), np.int64, len(msgs))[batch.index]
            self.queue.put(batch.features, batch.labels, tp.partition, offsets)

    async def _ingest_readings(self, tp: TopicPartition, msgs: list[Any]) -> None:
        assert isinstance(self.decoder, ReadingDecoder) and self.assembler is not None
        windows = []
        for m in msgs:
            try:
                reading = self.decoder.decode(m.value, m.headers, m.key)
                windows += self.assembler.push(reading, (tp.partition, m.offset))
            except DecodeError as err:
                await self._dead_letter(m, err)
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
            log.warning("collapse guard: %s snapshot withheld (latest batch hard entropy below "
                        "%.3f nats)", "final" if final else "periodic", trainer.guard.threshold)
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
        log.info("published snapshot version %d (samples_seen %d, offsets %s)%s", version,
                 trainer.model.samples_seen_, offsets, " [final]" if final else "")

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
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        # Asking the coordinator for committed offsets here would wait on the very rebalance
        # that calls us, so the consumer starts at the committed offsets by itself and _ingest
        # skips what the snapshot already contains (offsets below the snapshot's).
        skips = {}
        for tp in assigned:
            snap_off = self.checkpoint_offsets.get(f"{tp.topic}:{tp.partition}")
            if snap_off is not None and tp.topic == self.settings.topic:
                self.skip_below[tp.partition] = snap_off
                skips[tp.partition] = snap_off
        log.info("partitions assigned: %s; starting at the committed offsets, skipping what "
                 "the snapshot covers %s", sorted(tp.partition for tp in assigned), skips)
