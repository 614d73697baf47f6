"""The active phase of a worker holding the lease: fetch, ingest, train, checkpoint, commit.

:class:`TrainingLoop` is built once the lease is held and the model loaded; it owns the
consumer, the dead-letter producer, the :class:`~oclust.training_worker.ledger.OffsetLedger` and an
:class:`~oclust.training_worker.ingest.Ingest` strategy, and runs until asked to stop or the lease
is lost. Training runs on one thread that owns the model, or in a training process
(:mod:`oclust.training_worker.trainproc`), pipelined with the next fetch: up to the trainer's
``steps_ahead`` batches are handed to it ahead, so decoding the next fetch overlaps the current
step and heartbeats keep flowing.

At-least-once: a checkpoint publishes a snapshot covering exactly the trained (or
dead-lettered) messages, then commits those offsets; nothing is committed that a stored
snapshot does not cover. The collapse guard holds publishing back while the model is
collapsed. Crash loops: before touching a fetch, the ledger marks it in the store; suspect
messages are trained one at a time, poison ones dead-lettered.

Example:
    >>> DLQ_REASONS[-2:]  # the loop's own reasons, after the decoders'
    ('late_reading', 'poison')
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from oclust.training_worker.codec import REASONS, DecodeError
from oclust.training_worker.ingest import Ingest
from oclust.training_worker.kafka import DeadLetters, dead_letter_headers
from oclust.training_worker.lease import Lease
from oclust.training_worker.ledger import OffsetLedger
from oclust.training_worker.monitor import WorkerMetrics
from oclust.training_worker.resume import FaultMetrics, WorkerHalt, check_offset
from oclust.training_worker.settings import WorkerSettings
from oclust.training_worker.store import LeaseLost, SnapshotStore, StoreError
from oclust.training_worker.stream import Consumer
from oclust.training_worker.trainer import MODEL_FAULTS, Trainer

__all__ = ["DLQ_REASONS", "TrainingLoop"]

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 0.2
# Every torch op of a step drops the GIL and takes it back; while the event loop decodes, the
# training thread would wait up to CPython's switch interval (5 ms) for it each time. A short
# interval lets the step's GIL-free compute overlap the decode instead of queueing behind it.
SWITCH_INTERVAL_S = 0.0005
DLQ_REASONS = (*REASONS, "late_reading", "poison")


_running = [0, 0.0]  # loops running in this process, the switch interval before the first


@contextlib.contextmanager
def _steady_process() -> Iterator[None]:
    """While any loop of the process runs: ``SWITCH_INTERVAL_S``, and the objects alive when the
    first began (torch, the model, the clients: ~300,000) frozen out of the cyclic garbage
    collector (:func:`gc.freeze`). Each full collection walked them all, stalling the event
    loop ~150-300 ms while the training process emptied its queue of steps. Both undone after
    the last loop (:func:`gc.unfreeze`: what became garbage meanwhile is collected then)."""
    if _running[0] == 0:
        _running[1] = sys.getswitchinterval()
        sys.setswitchinterval(min(_running[1], SWITCH_INTERVAL_S))
        gc.freeze()
    _running[0] += 1
    try:
        yield
    finally:
        _running[0] -= 1
        if _running[0] == 0:
            sys.setswitchinterval(_running[1])
            gc.unfreeze()


class _Rebalance(ConsumerRebalanceListener):
    """Forwards aiokafka's rebalance callbacks to the loop (the only place to commit then)."""

    def __init__(self, loop: TrainingLoop) -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.loop.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.loop.on_assigned(set(assigned))


class TrainingLoop:
    """One lease's worth of training (see the module docstring); ``await loop.run()``.

    Args:
        settings: the worker's configuration.
        trainer: the loaded model, guard and quality window.
        ingest: the decoding strategy of ``settings.mode``.
        ledger: offsets (resumed from the trainer's snapshot) and crash-loop marks.
        consumer, dlq: the Kafka (or in-process) consumer and the dead-letter producer.
        lease, store: the lease held and the store snapshots go to.
        executor: the one thread that owns the model (unused by a training process's trainer).
        metrics, faults: Prometheus metrics.
        stop, lease_lost: events that end :meth:`run`.
        check_offsets: check snapshot offsets against the log on assignment (Kafka only).
        last_version: the version this worker published last (under an earlier lease).
    """

    def __init__(self, settings: WorkerSettings, trainer: Trainer, ingest: Ingest,
                 ledger: OffsetLedger, consumer: Consumer, dlq: DeadLetters, lease: Lease,
                 store: SnapshotStore, executor: Executor, metrics: WorkerMetrics,
                 faults: FaultMetrics, stop: asyncio.Event, lease_lost: asyncio.Event,
                 check_offsets: bool = True, last_version: int | None = None) -> None:
        self.settings = settings
        self.trainer = trainer
        self.ingest = ingest
        self.queue = ingest.queue
        self.ledger = ledger
        self.consumer = consumer
        self.dlq = dlq
        self.lease = lease
        self.store = store
        self.executor = executor
        self.metrics = metrics
        self.faults = faults
        self.stop = stop
        self.lease_lost = lease_lost
        self.check_offsets = check_offsets
        self.listener = _Rebalance(self)
        self.inflight: deque[asyncio.Future[Any]] = deque()
        self.lock = asyncio.Lock()
        self.last_checkpoint = time.monotonic()
        self.last_version = last_version
        self.messages = 0
        self.dlq_count = 0
        self.fatal: BaseException | None = None

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        """Fetch, ingest, train and checkpoint until stopped (final snapshot) or lease lost."""
        with _steady_process():
            try:
                await self._run()
            except MODEL_FAULTS:  # no death of the messages in hand: none of them is poison
                await asyncio.to_thread(self.ledger.clear)
                raise
            finally:  # after a failed step the others fail alike: one error is enough
                for step in self.inflight:
                    if step.done() and not step.cancelled():
                        step.exception()
                    step.cancel()

    async def _run(self) -> None:
        s = self.settings
        max_records = max(s.batch_size * 4, 1000)
        while not self.stop.is_set() and not self.lease_lost.is_set():
            fatal = self.fatal or self.trainer.failure  # e.g. the training process died
            if fatal is not None:
                raise fatal
            records = await self.consumer.getmany(timeout_ms=self._fetch_timeout_ms(),
                                                  max_records=max_records)
            async with self.lock:
                if records:
                    await self.ingest_records(records)
                await self.train_ready(force=False)
                if self._checkpoint_due():
                    await self.checkpoint()
        if self.lease_lost.is_set():
            await self.await_steps()
            return  # another worker may own the namespace now: publish nothing
        async with self.lock:
            await self.train_ready(force=True)
            await self.checkpoint(final=True)
            # a clean stop is no death, whatever the final snapshot covered (it may have been
            # withheld): leaving the marks would count one against the messages in hand
            await asyncio.to_thread(self.ledger.clear)
        log.info("stopped cleanly: %s", self.trainer.describe())

    def _fetch_timeout_ms(self) -> int:
        timeout = FETCH_TIMEOUT_S
        if self.queue.first_at is not None:
            left = self.settings.batch_timeout - (time.monotonic() - self.queue.first_at)
            timeout = min(timeout, max(left, 0.0))
        return int(timeout * 1000)

    # ------------------------------------------------------------------ ingest
    async def ingest_records(self, records: dict[TopicPartition, list[Any]]) -> None:
        """Mark, decode and queue one fetch; dead letters are acknowledged before returning."""
        ledger = self.ledger
        fetched = {}
        for tp, msgs in records.items():
            target = ledger.rewound(tp.partition, msgs)
            if target is not None:
                log.warning("%s:%d: the group committed up to %d but the snapshot holds only "
                            "the messages below %d: training %d..%d again", tp.topic,
                            tp.partition, msgs[0].offset, target, target, msgs[0].offset - 1)
                self.consumer.seek(tp, target)
                continue
            fetched[tp] = ledger.unseen(tp.partition, msgs)
        his = {tp.partition: msgs[-1].offset + 1 for tp, msgs in fetched.items() if msgs}
        firsts = {tp.partition: msgs[0].offset for tp, msgs in fetched.items() if msgs}
        await asyncio.to_thread(ledger.mark, his, firsts)
        if not self.ingest.settled:  # a fresh model: the majority's layout, all partitions
            plain = [m for msgs in fetched.values() for m in msgs  # never probe a suspect
                     if not (ledger.is_poison(m) or ledger.is_suspect(m))]
            try:
                if len(plain) > 1:
                    self.ingest.settle(plain)
            except Exception:  # the decoders promise DecodeError only; never die on a message
                log.exception("settling the input layout failed: the first valid message sets it")
        for tp, msgs in fetched.items():
            if not msgs:
                continue
            self.messages += len(msgs)
            self.metrics.messages.inc(len(msgs))
            for part in ledger.split_suspects(tp.partition, msgs):
                if ledger.is_poison(part[0]):
                    await self._skip_poison(part[0])
                elif ledger.is_suspect(part[0]):
                    await self._ingest_alone(tp, part[0])
                else:
                    await self._decode(tp.partition, part)
            ledger.fetched(tp.partition, msgs[-1].offset + 1)
            high = self.consumer.highwater(tp)
            if high is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(0, high - msgs[-1].offset - 1))
        if await self.dlq.flush():
            log.debug("dead letters acknowledged")

    async def _decode(self, partition: int, msgs: list[Any]) -> None:
        for msg, err in self.ingest.decode(partition, msgs):
            await self._dead_letter(msg, err)

    async def _ingest_alone(self, tp: TopicPartition, msg: Any) -> None:
        """Decode and train one suspect message by itself, marked alone in the store."""
        await self.await_steps()
        await self.train_ready(force=True)
        await asyncio.to_thread(self.ledger.mark_alone, tp.partition, msg.offset)
        await self._decode(tp.partition, [msg])
        await self.train_ready(force=True)
        self.ledger.trained_alone(msg)
        await asyncio.to_thread(self.ledger.remark)  # the rest of the fetch is in hand again

    async def _skip_poison(self, msg: Any) -> None:
        err = DecodeError("poison", f"crashed the worker {self.settings.max_attempts} times")
        await self._dead_letter(msg, err)
        self.faults.poison.inc()
        self.ledger.skipped_poison(msg)

    async def _dead_letter(self, msg: Any, err: DecodeError) -> None:
        headers = dead_letter_headers(msg.headers, err.reason, err.detail, msg.topic,
                                      msg.partition, msg.offset)
        await self.dlq.send(msg.key, msg.value, headers)
        self.dlq_count += 1
        self.metrics.dlq.labels(err.reason).inc()
        log.warning("dead letter %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, err)

    # ------------------------------------------------------------------ train
    async def train_ready(self, force: bool) -> None:
        """Hand full batches (and, when ``force`` or aged, the rest) to the training thread."""
        s = self.settings
        while self.inflight and self.inflight[0].done():  # a step that raised raises here
            await self.inflight.popleft()
        while len(self.queue) >= s.batch_size or (len(self.queue) and (force or self._aged())):
            batch = self.queue.take(s.batch_size)
            while len(self.inflight) >= self.trainer.steps_ahead:
                await self.inflight.popleft()
            # the one training thread runs queued steps back to back, without the event loop
            self.inflight.append(asyncio.ensure_future(
                self.trainer.run_step(batch, self.executor)))
        if force:
            await self.await_steps()

    def _aged(self) -> bool:
        first = self.queue.first_at
        return first is not None and time.monotonic() - first >= self.settings.batch_timeout

    async def await_steps(self) -> None:
        """Wait until every submitted step has run."""
        while self.inflight:
            await self.inflight.popleft()

    # ------------------------------------------------------------------ checkpoint
    def _checkpoint_due(self) -> bool:
        return time.monotonic() - self.last_checkpoint >= self.settings.snapshot_interval

    def _covered(self) -> dict[str, int]:
        return self.ledger.covered(self.ingest.pending())

    def _covered_state(self, offsets: dict[str, int]) -> dict[str, dict[str, Any]]:
        """What the model holds beyond ``offsets``, per "topic:partition" (``OffsetState``)."""
        found = self.ingest.resume_state(self.ledger.own(offsets), self.ledger.consumed)
        state = {self.ledger.key(p): s for p, s in found.items()}
        for key, held in self.ledger.checkpoint_state.items():  # a partition not taken over
            if key not in state and offsets.get(key) == self.ledger.checkpoint.get(key):
                state[key] = held
        return state

    async def checkpoint(self, final: bool = False) -> None:
        """Publish a snapshot of the trained state, then commit the offsets it covers."""
        await self.await_steps()
        self.last_checkpoint = time.monotonic()
        trainer = self.trainer
        offsets = self._covered()
        if not trainer.can_snapshot:
            return
        if trainer.steps_since_snapshot == 0 and offsets == self.ledger.published:
            return  # nothing new
        if not trainer.guard.healthy:
            log.warning("collapse guard: %s snapshot withheld (served hard entropy over the "
                        "recent window below %.3f nats)", "final" if final else "periodic",
                        trainer.guard.threshold)
            return
        if trainer.refused_in_a_row:  # maybe a model blown up to NaN: publish it never
            log.warning("%s snapshot withheld: the model refused the last %d batch(es); the "
                        "next trained batch publishes, %d refusals in a row stop the worker",
                        "final" if final else "periodic", trainer.refused_in_a_row,
                        trainer.max_refused)
            return
        extra = {"messages": float(self.messages), "dead_letters": float(self.dlq_count)}
        beyond = self._covered_state(offsets)
        snap = await trainer.run_snapshot(offsets, extra, self.executor, beyond)
        if not await asyncio.to_thread(trainer.publishable, snap):
            log.warning("collapse guard: %s snapshot withheld (it serves a sample of the older "
                        "inputs with hard entropy below %.3f nats, though the recent window "
                        "looks healthy: it learned a burst)", "final" if final else "periodic",
                        trainer.guard.threshold)
            return
        if self.settings.store_sample:  # a worker resumed from it judges on the sample too
            snap = await asyncio.to_thread(trainer.with_sample, snap)
        if not await asyncio.to_thread(self.lease.renew):
            self.lease_lost.set()
            log.error("lease lost before publishing: snapshot dropped")
            return
        try:  # fenced: published only while the lease is still ours, in one atomic step
            version = await asyncio.to_thread(self.store.publish, snap, self.lease.owner)
        except LeaseLost as exc:
            self.lease_lost.set()
            log.error("%s", exc)
            return
        except StoreError as exc:
            log.error("publishing failed, offsets not committed; retrying at the next "
                      "checkpoint: %s", exc)
            return
        trainer.published(snap.with_version(version))
        self.ledger.checkpoint, self.ledger.published = offsets, dict(offsets)
        self.ledger.checkpoint_state = beyond
        self.last_version = version
        self.metrics.published.inc()
        self.metrics.version.set(version)
        await self._commit(offsets)
        await asyncio.to_thread(self.ledger.shrink_marks, offsets)
        log.info("published snapshot version %d (samples_seen %d, offsets %s)%s", version,
                 snap.meta.samples_seen, offsets, " [final]" if final else "")

    async def _commit(self, offsets: dict[str, int]) -> None:
        assigned = self.consumer.assignment()
        commit = {TopicPartition(self.settings.topic, p): off
                  for p, off in self.ledger.own(offsets).items()}
        commit = {tp: off for tp, off in commit.items() if tp in assigned}
        if not commit:
            return
        try:
            await self.consumer.commit(commit)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("offset commit refused (%s); the rebalance listener commits next", exc)

    # ------------------------------------------------------------------ rebalance
    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Checkpoint before the partitions go; drop what waits from them."""
        if not revoked:
            return
        async with self.lock:
            await self.checkpoint()
            parts = {tp.partition for tp in revoked if tp.topic == self.settings.topic}
            held = {self.ledger.key(p): o for p, o in self.ledger.own(self._covered()).items()
                    if p in parts}  # what the model holds of them, published or not
            self.ledger.hold(held, self._covered_state(held))
            self.ingest.forget_partitions(parts)
            self.ledger.forget_partitions(parts)
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Skip what the snapshot covers; check its offsets against the log first."""
        # Asking the coordinator for committed offsets here would wait on the very rebalance
        # that calls us, so the consumer starts at the committed offsets by itself; the ledger
        # skips what the snapshot already contains (offsets below the snapshot's) and seeks
        # back to the snapshot's offset if the first fetch starts past it. Both are set before
        # any await: the consumer fetches while this listener runs.
        ours = {}
        for tp in assigned:
            snap_off = self.ledger.checkpoint.get(f"{tp.topic}:{tp.partition}")
            if snap_off is None or tp.topic != self.settings.topic:
                continue
            ours[tp] = snap_off
            self.ledger.skip_below[tp.partition] = snap_off
            self.ledger.rewind[tp.partition] = snap_off
            held = self.ledger.checkpoint_state.get(f"{tp.topic}:{tp.partition}")
            self.ingest.resume_from(tp.partition, snap_off, held)  # skip what it holds beyond
        skips = {}
        for tp, snap_off in ours.items():
            if self.check_offsets:
                try:
                    start = await check_offset(self.consumer, self.settings, self.faults, tp,
                                               snap_off)
                except WorkerHalt as exc:
                    self.fatal = exc
                    continue
                if start is not None:
                    self.consumer.seek(tp, start)  # a new incarnation: all of it is new
                    self.ledger.reset_partition(tp.partition, start)
                    self.ingest.resume_from(tp.partition, start, None)
                    continue
            skips[tp.partition] = snap_off
        log.info("partitions assigned: %s; starting at the committed offsets, skipping what "
                 "the snapshot covers %s", sorted(tp.partition for tp in assigned), skips)
