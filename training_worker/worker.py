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
   training process fed through shared memory (``train_process``, the default with Kafka;
   :mod:`oclust.training_worker.trainproc`) or in a thread
   (:mod:`oclust.training_worker.thread`), pipelined with the next fetch, so heartbeats keep
   flowing and decoding overlaps the step. Either one that hangs for ``train_timeout`` stops
   the worker (exit 1) as a death would.
4. **Checkpoint** — every ``snapshot_interval`` seconds: publish a snapshot covering exactly
   the trained (or dead-lettered) messages, then commit those offsets. At-least-once: nothing
   is committed that a stored snapshot does not cover. The collapse guard holds publishing
   back while the model is collapsed (and may restore the last healthy weights).
5. **Stop** — SIGTERM/SIGINT: finish the batch, train what is queued, snapshot, commit, exit 0.

Faults (RELIABILITY.md states the guarantees and the tests behind them):

* **Hostile messages** — the decoders raise nothing but ``DecodeError``; anything else a
  message trips is still a dead letter (``decode_failed``), never an exception out of the loop.
* **Crash loops** — before touching a fetch the worker marks in the store, per partition, the
  offsets it holds that no snapshot covers (:class:`~oclust.training_worker.lease.ProgressLog`). The
  next holder of the lease reads the mark: one death is replayed as usual; a span that killed
  two holders is taken one message at a time, each marked alone; a message that killed
  ``max_attempts`` holders goes to the DLQ as ``poison`` and is skipped.
* **Offset regressions** — on assignment, a snapshot offset beyond the log's end (confirmed by
  reading its last message back) is a new incarnation of the topic: logged, counted, and
  trained from the start (``offset_regression="reset"``), or the worker halts (``"exit"``).
* **Empty store** — with no snapshot but committed offsets in the group, the worker refuses
  to start a fresh model unless ``allow_fresh``.

Where it lives: this module holds the lease and standby, the signals and the metrics server;
:mod:`oclust.training_worker.resume` loads the model and checks offsets,
:mod:`oclust.training_worker.loop` is the active phase, :mod:`oclust.training_worker.ledger` the
offsets and crash-loop marks, and :mod:`oclust.training_worker.ingest` the two decoding strategies
(samples, readings).

Example:
    >>> from oclust.training_worker.settings import WorkerSettings
    >>> w = TrainingWorker(WorkerSettings(topic="digits", store="file:///tmp/oclust-doc"))
    >>> w.settings.dlq_topic_name
    'digits.dlq'
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import start_http_server
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from oclust.training_worker.ingest import make_ingest
from oclust.training_worker.kafka import DLQ_HEADROOM, DeadLetters, ensure_topic
from oclust.training_worker.lease import Lease, make_lease, make_progress_log
from oclust.training_worker.ledger import OffsetLedger
from oclust.training_worker.loop import DLQ_REASONS, TrainingLoop
from oclust.training_worker.monitor import WorkerMetrics
from oclust.training_worker.resume import (
    FaultMetrics,
    FreshStartRefused,
    WorkerHalt,
    load_trainer,
    refuse_fresh_start,
)
from oclust.training_worker.settings import WorkerSettings
from oclust.training_worker.store import SnapshotStore, StoreError, open_store
from oclust.training_worker.stream import Consumer, LocalStream, Producer
from oclust.training_worker.thread import TrainingThread
from oclust.training_worker.trainer import Trainer, TrainerHooks
from oclust.training_worker.trainproc import ProcessTrainer

__all__ = ["DLQ_REASONS", "FaultMetrics", "FreshStartRefused", "TrainingWorker", "WorkerHalt"]

log = logging.getLogger(__name__)

FETCH_BYTES = 8 << 20  # per partition and fetch: few broker round trips per batch


def _unreachable(exc: StoreError) -> bool:
    """Whether ``exc`` comes from a connection problem (not from what the store holds)."""
    return isinstance(exc.__cause__, (RedisConnectionError, RedisTimeoutError, OSError))


def _init_training_thread(torch_threads: int | None) -> None:
    """Initializer of the training thread: torch's intra-op threads are set per thread."""
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)


async def _started(client: Consumer | Producer) -> None:
    """Start a Kafka client; on failure close it (no 'unclosed client' noise) and re-raise."""
    try:
        await client.start()
    except BaseException:
        await client.stop()
        raise


class TrainingWorker:
    """A long-running trainer for one namespace; ``await worker.run()`` until stopped.

    Args:
        settings: the configuration (see :class:`WorkerSettings`).
        store: an open snapshot store (default: ``open_store(settings.store, ...)``).
        metrics: Prometheus metrics (default: a fresh registry).
        hooks: callbacks in the training thread (tests, embedding).
        stream: an in-process :class:`~oclust.training_worker.stream.LocalStream` to read instead of
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
        self.metrics_port: int | None = None
        self.active: TrainingLoop | None = None  # while (and after) the lease is held
        self._stop = asyncio.Event()
        self._lease_lost = asyncio.Event()
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

    @property
    def trainer(self) -> Trainer | None:
        """The model's trainer of the last lease held (``None`` before any)."""
        return self.active.trainer if self.active is not None else None

    @property
    def last_version(self) -> int | None:
        """The version of the last snapshot this worker published."""
        return self.active.last_version if self.active is not None else None

    def request_stop(self) -> None:
        """Ask the worker to finish the batch, snapshot, commit and return (signal-safe)."""
        self._stop.set()

    async def run(self, handle_signals: bool = False) -> int:
        """Serve until stopped; returns the process exit code (0 on a clean stop)."""
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
        while True:
            await asyncio.sleep(lease.ttl / 3)  # renewal period, not synchronisation
            if not await asyncio.to_thread(lease.renew):
                self._lease_lost.set()
                return

    # ------------------------------------------------------------------ active phase
    async def _serve(self, lease: Lease) -> None:
        executor = TrainingThread(self.settings.train_timeout, _init_training_thread,
                                  (self.settings.torch_threads,))
        try:
            await self._serve_with(lease, executor)
        except StoreError as exc:
            # the store went away under an active worker (a progress mark, a load): it cannot
            # prove it holds the lease, so it steps back to standby and waits for the store
            if not (_unreachable(exc) or not await asyncio.to_thread(lease.renew)):
                raise
            log.error("the store is unreachable while active: %s", exc)
            self._lease_lost.set()
        finally:
            executor.shutdown(wait=True)

    async def _serve_with(self, lease: Lease, executor: TrainingThread) -> None:
        s = self.settings
        in_process = s.train_process and self.stream is None
        trainer = await asyncio.get_running_loop().run_in_executor(
            executor, load_trainer, s, self.store, self.metrics, self.faults, self.hooks,
            "cpu" if in_process else None)  # a training process owns the device
        if trainer.healthy is None and not trainer.model.is_fitted and self.stream is None:
            await refuse_fresh_start(s, self.store)
        if not in_process:
            await self._train_with(lease, executor, trainer)
            return
        remote = await ProcessTrainer.start(trainer, s)
        try:
            await self._train_with(lease, executor, remote)
        except BaseException:
            await remote.proc.shutdown()
            raise
        await remote.close(export=True)  # the final weights come back as trainer.model

    async def _train_with(self, lease: Lease, executor: TrainingThread,
                          trainer: Trainer) -> None:
        s = self.settings
        shape = trainer.model.input_shape_ if trainer.model.is_fitted else None
        ingest = make_ingest(s, shape)
        checkpoint = trainer.healthy.meta.offsets if trainer.healthy else {}
        beyond = trainer.healthy.meta.offset_state if trainer.healthy else {}
        if (self.stream is not None and trainer.healthy is not None
                and self.stream.continues(s.topic, trainer.healthy.version)):
            beyond = {}  # what the snapshot held beyond its offsets went with the old stream
        ledger = OffsetLedger(s.topic, checkpoint, make_progress_log(self.store), s.max_attempts,
                              beyond)
        await asyncio.to_thread(ledger.read_crash_marks, self.faults.crash_recoveries.inc)
        producer: Producer
        consumer: Consumer
        if self.stream is not None:
            producer = self.stream.producer()
        else:
            with contextlib.suppress(KafkaError):
                await ensure_topic(s.bootstrap_servers, s.dlq_topic_name)
            producer = AIOKafkaProducer(  # room for a dead letter of the largest message
                bootstrap_servers=s.bootstrap_servers, linger_ms=5,
                max_request_size=max(1 << 20, s.max_message_bytes + DLQ_HEADROOM),
            )
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
                    max_partition_fetch_bytes=max(FETCH_BYTES, 2 * s.max_message_bytes),
                    fetch_max_bytes=max(8 * FETCH_BYTES, 2 * s.max_message_bytes),
                )
            self.active = TrainingLoop(
                s, trainer, ingest, ledger, consumer, DeadLetters(producer, s.dlq_topic_name),
                lease, self.store, executor, self.metrics, self.faults, self._stop,
                self._lease_lost, check_offsets=self.stream is None,
                last_version=self.last_version,
            )
            consumer.subscribe([s.topic], listener=self.active.listener)
            await _started(consumer)
            try:
                await self.active.run()
            finally:
                await consumer.stop()
        finally:
            await producer.stop()
