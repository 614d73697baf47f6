"""The training step in its own process, fed through shared memory (``train_process``).

In one interpreter the asyncio loop (fetch, decode) and the training thread share one GIL, which
torch drops and retakes around every operator. Here the model lives in a child process, and the
worker keeps the rest (offsets, commits, the guard, the DLQ, the lease, metrics, hooks):

* :class:`TrainProcess` — the parent's handle. Batches go into a ring of float32 slots in
  :mod:`multiprocessing.shared_memory` (one copy in; the child trains on a view of its slot,
  zero-copy); a pipe carries only commands (slot, sample count) and replies (the step's report:
  served labels for the guard, loss, the model's counters and prior). Every command gets one
  reply, in order (a few step replies may share one message), so up to ``STEPS_AHEAD`` steps
  queue in the child while the worker decodes the next fetch.
* :class:`ProcessTrainer` — a :class:`~oclust.training_worker.trainer.Trainer` whose
  ``run_step`` and ``run_snapshot`` go to the process; the guard, live quality and hooks run on
  the replies, in the event loop's thread. The guard's restore is a command ordered after the
  steps already sent; those steps are sent again, to train the restored weights.

Failure and shutdown: the child (:mod:`oclust.training_worker.trainchild`) ignores SIGINT/SIGTERM
(the worker stops it after the final snapshot), exits when the worker's end of the pipe closes (a
kill -9 of the worker), and unlinks the ring then. Its death makes the worker fail with
:class:`TrainProcessDied` (a :class:`~oclust.training_worker.resume.WorkerHalt`: ``oclust worker``
exits 1), never hang; so does a child that goes ``train_timeout`` seconds without answering
while commands wait (a hung step, snapshot or export), killed then. The child owns the torch
device (CUDA is initialised there only); the worker holds a CPU copy of the model as resumed,
replaced by the final weights at a clean stop.

Children come from a ``forkserver`` that imported torch and the model once (a restart after a
lost lease costs a fork); a script that embeds the worker needs ``if __name__ == "__main__":``.

Example:
    >>> from oclust.training_worker.trainproc import STEPS_AHEAD
    >>> STEPS_AHEAD
    16
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import os
import tempfile
from collections import deque
from concurrent.futures import Executor
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from oclust.model import OnlineClusterer, Snapshot, StepReport
from oclust.model.snapshot import OffsetState
from oclust.training_worker.batching import Batch
from oclust.training_worker.resume import WorkerHalt
from oclust.training_worker.ring import RING_MAX_BYTES, open_ring
from oclust.training_worker.settings import WorkerSettings
from oclust.training_worker.trainchild import Facts, child_main
from oclust.training_worker.trainer import ModelBroken, Trainer

__all__ = ["ProcessTrainer", "TrainProcess", "TrainProcessDied"]

log = logging.getLogger(__name__)

# Steps queued in the child: enough to cover a fetch round trip of the broker (a slot is one
# batch: 64 KiB for 256 digits), not so many that a checkpoint waits long for them.
STEPS_AHEAD = 16
STOP_TIMEOUT_S = 10.0


class TrainProcessDied(WorkerHalt):
    """The training process exited or failed: the worker stops (its supervisor restarts it)."""


# ---------------------------------------------------------------------- the parent
class TrainProcess:
    """The worker's handle on its training process (see the module docstring).

    Args:
        settings: the worker's configuration (the child builds its model from it).
        snapshot: the snapshot to resume from (``None``: a fresh model).
        in_flight: steps the worker hands over ahead (sizes the ring).
    """

    def __init__(self, settings: WorkerSettings, snapshot: Snapshot | None,
                 in_flight: int) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # torch and the model imported once, forked
        self.settings = settings
        self.in_flight = in_flight
        self.conn, self._child_end = ctx.Pipe()
        self.proc = ctx.Process(target=child_main, args=(self._child_end, settings, snapshot),
                                name="oclust-train", daemon=True)
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.failure: TrainProcessDied | ModelBroken | None = None
        self.closing = False
        self.ring: SharedMemory | None = None
        self.slots: np.ndarray | None = None
        self.free: list[int] | None = []  # free slots; None: no ring can be made
        self._freed = asyncio.Event()  # a slot came back
        self._send_lock = asyncio.Lock()  # steps go out in the order they were asked for
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadline: asyncio.TimerHandle | None = None  # of the oldest command waiting

    async def start(self) -> Facts:
        """Start the child and wait until it built its model; its counters and prior."""
        self._loop = asyncio.get_running_loop()
        hello = self._loop.create_future()
        self.pending.append(hello)  # the child's first reply, unasked
        await asyncio.to_thread(self.proc.start)  # the first start launches the fork server
        self._child_end.close()  # EOF on our end once the child is gone
        # an interpreter exiting without shutdown(): EOF lets the child go (it ignores the
        # SIGTERM multiprocessing's own exit hook sends, then joins it)
        atexit.register(self.conn.close)
        self._loop.add_reader(self.conn.fileno(), self._readable)
        self._watch()  # building the model counts as the first command
        return await hello

    def call(self, *cmd: Any) -> asyncio.Future[Any]:
        """Send a command; the future of its reply (replies come in order)."""
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        if self.failure is None:
            try:
                self.conn.send(cmd)
            except OSError:
                self._died()
        if self.failure is not None:
            fut.set_exception(self.failure)
            return fut
        self.pending.append(fut)
        if self._deadline is None:
            self._watch()
        return fut

    def call_later(self, *cmd: Any) -> asyncio.Future[Any]:
        """A command nobody awaits: its failure sets :attr:`failure`, which stops the worker."""
        fut = self.call(*cmd)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no log
        return fut

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                for status, payload in self.conn.recv():  # one or more replies, in order
                    fut = self.pending.popleft()
                    if fut.done():
                        continue
                    if status == "ok":
                        fut.set_result(payload)
                    elif status == "fault":  # a broken model: the worker stops, no crash
                        log.error("the model in the training process is broken:\n%s", payload[1])
                        error = ModelBroken(payload[0])
                        self.failure = self.failure or error
                        fut.set_exception(error)
                    else:  # as an exception in the training thread would: the worker stops
                        log.error("the training process failed:\n%s", payload)
                        last = str(payload).strip().splitlines()[-1:] or ["?"]
                        error = TrainProcessDied(f"the training process failed: {last[0]}")
                        self.failure = self.failure or error
                        fut.set_exception(error)
        except (EOFError, OSError, IndexError):
            self._died()
            return
        self._watch()  # an answer: the next command waiting gets the whole timeout

    def _watch(self) -> None:
        """Restart the deadline: ``train_timeout`` from now while commands wait, else none."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.pending and self.failure is None and self._loop is not None:
            self._deadline = self._loop.call_later(self.settings.train_timeout, self._hung)

    def _hung(self) -> None:
        """No answer within ``train_timeout``: the child is killed and counts as dead."""
        self._deadline = None
        self.failure = TrainProcessDied(
            f"the training process (pid {self.proc.pid}) did not answer within "
            f"{self.settings.train_timeout:g} s (train_timeout): killed")
        log.error("%s", self.failure)
        with contextlib.suppress(OSError):
            self.proc.kill()
        self._died()

    def _detach(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.conn.fileno())

    def _died(self) -> None:
        self._detach()
        self._freed.set()  # a step waiting for a slot sees the failure
        if self.closing and not self.pending:
            return  # a closed child's end of the pipe closes too
        if self.failure is None:
            self.proc.join(0.5)  # it closed its end: it is exiting
            self.failure = TrainProcessDied(
                f"the training process (pid {self.proc.pid}) died, exit code "
                f"{self.proc.exitcode}")
            log.error("%s", self.failure)
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(self.failure)
                fut.exception()  # retrieved: a future nobody awaits logs nothing

    async def step(self, x: np.ndarray) -> tuple[StepReport | None, str | None, float, Facts]:
        """Train on ``x`` in the child; (report or None, refusal, seconds, facts).

        ``x`` goes into a ring slot (waiting for one if the ring is full), else by pipe once the
        child answered all before it: a large send to a busy child, whose replies fill the other
        direction, would block both ends for good.
        """
        async with self._send_lock:
            slot = await self._slot(x)
            if slot < 0:
                await self._drain()
            fut = self.call("step", slot, x.shape, x if slot < 0 else None)
        if slot < 0:
            return await fut
        try:
            return await fut
        finally:
            assert self.free is not None
            self.free.append(slot)
            self._freed.set()

    async def _drain(self) -> None:
        """Wait until the child answered every command sent so far."""
        waiting = [fut for fut in self.pending if not fut.done()]
        if waiting:
            await asyncio.wait(waiting)

    async def _slot(self, x: np.ndarray) -> int:
        """A ring slot holding a copy of ``x`` (-1: send ``x`` through the pipe instead)."""
        if x.dtype != np.float32 or not len(x) or self.failure is not None:
            return -1
        if self.slots is None and not self._make_ring(x.shape[1:]):
            return -1
        assert self.slots is not None and self.free is not None
        if x.size > self.slots.shape[1]:
            return -1  # another sample shape than the first batch's
        while not self.free and self.failure is None:  # a full ring: wait for a slot
            self._freed.clear()
            await self._freed.wait()
        if self.failure is not None or self.slots is None:
            return -1
        slot = self.free.pop()
        self.slots[slot, : x.size] = x.reshape(-1)
        return slot

    def _make_ring(self, shape: tuple[int, ...]) -> bool:
        """Create the ring for samples of ``shape`` (once; False: it cannot be, use the pipe)."""
        if self.free is None:
            return False
        try:
            made = open_ring(self.settings.batch_size, shape, self.in_flight, RING_MAX_BYTES)
        except OSError as exc:
            log.warning("no shared memory for the training ring (%s): batches go by pipe", exc)
            self.free = None
            return False
        if made is None:
            return False  # a batch larger than the ring may be: every batch by pipe
        self.ring, self.slots = made
        self.free = list(range(len(self.slots)))
        self.call_later("ring_", self.ring.name, *self.slots.shape)
        return True

    async def close(self, export: bool) -> Snapshot | None:
        """Stop the child after the commands sent; its final weights if ``export``."""
        final = None
        try:
            if self.failure is None:
                self.closing = True
                final = await self.call("close", export)
        finally:
            await self.shutdown()
        return final

    async def shutdown(self) -> None:
        """Make sure the child is gone and the ring unlinked (idempotent)."""
        self._detach()
        await asyncio.to_thread(self._reap)

    def _reap(self) -> None:
        atexit.unregister(self.conn.close)
        if self.proc.pid is not None:  # started
            self.proc.join(STOP_TIMEOUT_S if self.closing else 0)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        self.conn.close()
        self._child_end.close()
        if self.ring is not None:
            self.slots = None
            with contextlib.suppress(BufferError):  # a view still held: unmapped at exit
                self.ring.close()
            with contextlib.suppress(FileNotFoundError):
                self.ring.unlink()
            self.ring = None


class ProcessTrainer(Trainer):
    """A :class:`Trainer` whose model lives in a :class:`TrainProcess`; its guard, quality
    window, hooks and healthy snapshot stay here, and ``model`` is the CPU copy it was built from
    until :meth:`close` brings the final weights back."""

    steps_ahead = STEPS_AHEAD

    def __init__(self, base: Trainer, proc: TrainProcess, facts: Facts) -> None:
        super().__init__(base.model, base.guard, base.metrics, base.quality, base.restore,
                         base.healthy, base.hooks, base.max_refused)
        self.proc = proc
        self.steps_ahead = proc.in_flight  # the ring has a slot for each, and a spare
        self.facts = facts
        self.generation = 0  # bumped by each restore: steps sent before it are sent again

    @classmethod
    async def start(cls, base: Trainer, settings: WorkerSettings,
                    in_flight: int = STEPS_AHEAD) -> ProcessTrainer:
        """Start the training process from ``base``'s healthy snapshot (or a fresh model)."""
        proc = TrainProcess(settings, base.healthy, in_flight)
        try:
            facts = await proc.start()
        except BaseException:
            await proc.shutdown()
            raise
        log.info("training in process %d (device %s)", proc.proc.pid, settings.device)
        return cls(base, proc, facts)

    @property
    def failure(self) -> BaseException | None:
        """Why the training process is gone (``None`` while it runs)."""
        return self.proc.failure

    def step(self, batch: Batch) -> StepReport | None:
        """Not here: the model is in the training process (``await run_step(batch, None)``)."""
        raise TypeError("a ProcessTrainer trains in its process: await run_step()")

    def snapshot(self, offsets: dict[str, int], extra: dict[str, float] | None = None,
                 offset_state: OffsetState | None = None) -> Snapshot:
        """Not here: the weights are in the training process (``await run_snapshot(...)``)."""
        raise TypeError("a ProcessTrainer's weights are in its process: await run_snapshot()")

    async def run_step(self, batch: Batch, executor: Executor | None) -> StepReport | None:
        """One step in the training process, then the guard, metrics and hooks here. A step
        sent before a restore (it trained the replaced weights) is sent again, after it."""
        while True:
            generation = self.generation
            report, refusal, seconds, self.facts = await self.proc.step(batch.x)
            if report is None:
                return self.refused(len(batch), refusal or "refused")
            if generation == self.generation:
                return self.observe(report, batch, seconds)

    async def run_snapshot(self, offsets: dict[str, int], extra: dict[str, float] | None,
                           executor: Executor | None,
                           offset_state: OffsetState | None = None) -> Snapshot:
        """The child's model as a snapshot covering ``offsets``, with this side's metrics."""
        snap: Snapshot = await self.proc.call("snapshot", offsets, self.snapshot_metrics(extra),
                                              offset_state)
        return snap

    def restore_healthy(self, healthy: Snapshot) -> OnlineClusterer:
        """Restore in the child, after the steps already sent; a CPU copy for the hook.

        The weights go by temporary file: a large send would block until the busy child reads.
        """
        self.generation += 1
        fd, path = tempfile.mkstemp(prefix="oclust-restore-", suffix=".safetensors")
        with os.fdopen(fd, "wb") as f:
            f.write(healthy.weights)
        fut = self.proc.call_later("restore", path, healthy.manifest_json())
        fut.add_done_callback(self._restored)
        fut.add_done_callback(lambda _: Path(path).unlink(missing_ok=True))
        if self.hooks.on_collapse is None:
            return self.model
        return OnlineClusterer.from_snapshot(healthy, device="cpu", verify=False)

    def _restored(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.facts = fut.result()

    def prior(self) -> np.ndarray:
        """The child's model's prior after its last reply."""
        return self.facts[3]

    @property
    def can_snapshot(self) -> bool:
        """The child's model has trained (restored weights wait for the guard's judgement:
        :meth:`oclust.training_worker.monitor.CollapseGuard.reset`)."""
        return self.facts[2]

    def describe(self) -> dict[str, Any]:
        """A few facts for logs."""
        return {"samples_seen": self.facts[0], "steps": self.facts[1],
                "collapse_events": self.guard.events}

    async def close(self, export: bool = True) -> None:
        """Stop the training process; with ``export``, its final weights become ``model``."""
        final = await self.proc.close(export)
        if final is not None:
            self.model = OnlineClusterer.from_snapshot(final, device="cpu", verify=False)
