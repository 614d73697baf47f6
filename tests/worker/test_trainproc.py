"""The training process (``train_process``): same steps as in a thread, deaths and stops clean.

In-process tests drive :class:`ProcessTrainer` directly; the last test runs ``oclust worker``
as a real process and kills its training process, then the worker itself, then stops it.
"""

from __future__ import annotations

import asyncio
import glob
import multiprocessing
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from oclust.model import datasets
from oclust.training_worker import trainproc
from oclust.training_worker.batching import Batch
from oclust.training_worker.kafka import committed_offsets
from oclust.training_worker.monitor import CollapseGuard, WorkerMetrics
from oclust.training_worker.producer import replay
from oclust.training_worker.resume import fresh_model
from oclust.training_worker.ring import RING_PREFIX
from oclust.training_worker.settings import WorkerSettings
from oclust.training_worker.store import open_store
from oclust.training_worker.trainchild import REPLIES_PER_SEND, child_main
from oclust.training_worker.trainer import Trainer
from oclust.training_worker.trainproc import ProcessTrainer, TrainProcessDied

from .test_worker_process import (
    FIRST,
    N_DIGITS,
    _produce_in_background,
    _train_then_sigterm,
    _wait_for_offset,
    _worker,
)


def _settings(tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(n_clusters=4, latent_dim=8, batch_size=64, seed=0, device="cpu",
                          torch_threads=1, store=f"file://{tmp_path}", metrics_port=-1)


def _trainer(s: WorkerSettings) -> Trainer:
    return Trainer(fresh_model(s, "cpu"), CollapseGuard(0.0, 5), WorkerMetrics())


def _rings(pid: int) -> list[str]:
    return glob.glob(f"/dev/shm/{RING_PREFIX}-{pid}-*")


def _wait_gone(pid: int, timeout: float = 30) -> bool:
    """Wait on a pidfd (an event, not a poll) until process ``pid`` exits."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_process_trainer_trains_as_the_thread_trainer(tmp_path):
    X, _ = datasets.load("digits")
    X = X[:64 * 6].astype(np.float32)
    labels = np.full(64, -1)
    s = _settings(tmp_path)
    torch.set_num_threads(1)
    local = _trainer(s)
    expected = [local.step(Batch(X[i:i + 64], labels)) for i in range(0, len(X), 64)]
    last = local.step(Batch(X[:64].astype(np.float64), labels))  # not float32: the pipe

    async def main() -> tuple[list, object, object, list[str]]:
        remote = await ProcessTrainer.start(_trainer(s), s, in_flight=4)
        try:
            # six steps at once through a ring of five slots: the sixth waits for a slot
            reports = await asyncio.gather(*(remote.run_step(Batch(X[i:i + 64], labels), None)
                                             for i in range(0, len(X), 64)))
            other = await remote.run_step(Batch(X[:64].astype(np.float64), labels), None)
            rings = _rings(os.getpid())
            snap = await remote.run_snapshot({"t:0": 7}, {"messages": 7.0}, None)
        except BaseException:
            await remote.proc.shutdown()
            raise
        await remote.close()
        return reports, other, (snap, remote), rings

    reports, other, (snap, remote), rings = asyncio.run(main())
    assert len(rings) == 1, "the batches did not go through a shared-memory ring"
    for got, want in zip(reports, expected, strict=True):
        np.testing.assert_array_equal(got.served_labels, want.served_labels)
        assert got.loss == pytest.approx(want.loss, rel=1e-5)
    np.testing.assert_array_equal(other.served_labels, last.served_labels)
    assert snap.meta.offsets == {"t:0": 7} and snap.meta.samples_seen == len(X) + 64
    assert snap.manifest["metrics"]["messages"] == 7.0
    # the final weights came back at close; the ring is gone
    np.testing.assert_array_equal(remote.model.predict(X), local.model.predict(X))
    assert remote.describe()["samples_seen"] == len(X) + 64
    assert not _rings(os.getpid())


def test_step_replies_share_a_message_while_steps_wait(tmp_path):
    """Steps already waiting in the pipe are answered up to REPLIES_PER_SEND per message, in
    order; the rest go as soon as the pipe is empty; any other command is answered at once."""
    X = datasets.load("digits")[0][:16].astype(np.float32)
    ctx = multiprocessing.get_context("forkserver")
    ours, theirs = ctx.Pipe()
    n_steps = REPLIES_PER_SEND + 2
    for _ in range(n_steps):  # all queued before the child reads its first command
        ours.send(("step", -1, X.shape, X))
    proc = ctx.Process(target=child_main, args=(theirs, _settings(tmp_path), None), daemon=True)
    proc.start()
    theirs.close()
    try:
        assert ours.poll(60), "the training process did not start"
        [(status, facts)] = ours.recv()
        assert status == "ok" and facts[1] == 0
        messages = [ours.recv() for _ in range(2)]
        ours.send(("close", False))
        bye = ours.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert [len(m) for m in messages] == [REPLIES_PER_SEND, 2]
    replies = messages[0] + messages[1]
    assert all(status == "ok" for status, _ in replies)
    assert [out[3][1] for _, out in replies] == list(range(1, n_steps + 1))  # steps, in order
    assert all(out[0].n == len(X) for _, out in replies)
    assert bye == [("ok", None)] and proc.exitcode == 0


def test_batches_too_large_for_the_ring_go_by_pipe(tmp_path, monkeypatch):
    X, _ = datasets.load("digits")
    s = _settings(tmp_path)
    monkeypatch.setattr(trainproc, "RING_MAX_BYTES", 64 * 64 * 4 - 1)  # not one batch
    torch.set_num_threads(1)
    local = _trainer(s)
    batches = [Batch(X[i:i + 64].astype(np.float32), np.full(64, -1)) for i in (0, 64)]
    expected = [local.step(b) for b in batches]

    async def main() -> tuple[list, list[str]]:
        remote = await ProcessTrainer.start(_trainer(s), s, in_flight=2)
        try:
            got = [await remote.run_step(b, None) for b in batches]
            return got, _rings(os.getpid())
        finally:
            await remote.close()

    got, rings = asyncio.run(main())
    assert rings == []  # no ring: each batch went through the pipe
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g.served_labels, e.served_labels)


def test_a_full_dev_shm_sends_batches_by_pipe_not_sigbus(tmp_path, monkeypatch):
    """posix_fallocate reserves the ring's pages when it is made: no room is an OSError then
    (the ring is unlinked, batches go by pipe), not a SIGBUS at the first write."""
    X, _ = datasets.load("digits")
    s = _settings(tmp_path)
    made: list[str] = []

    def no_room(fd: int, offset: int, length: int) -> None:
        made.extend(_rings(os.getpid()))  # the ring exists when its pages are asked for
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    batch = Batch(X[:64].astype(np.float32), np.full(64, -1))

    async def main() -> tuple[object, list[str]]:
        remote = await ProcessTrainer.start(_trainer(s), s, in_flight=2)
        try:
            return await remote.run_step(batch, None), _rings(os.getpid())
        finally:
            await remote.close()

    report, rings = asyncio.run(main())
    assert report is not None and len(made) == 1
    assert rings == []  # unlinked at once; the batch went through the pipe


@pytest.mark.timeout(120, method="thread")  # a deadlocked loop cannot take a signal
def test_many_large_pipe_batches_in_flight_do_not_deadlock(tmp_path, monkeypatch):
    """Batches of 1 MiB by pipe (no ring), eight asked for at once, replies of 64 KiB each:
    more than the pipe buffers hold in either direction. A send while the child is busy would
    block the event loop, the child's replies would fill up, and neither end would move."""
    X, _ = datasets.load("digits")
    big = np.resize(X.astype(np.float32), (4096, X.shape[1]))
    s = _settings(tmp_path)
    monkeypatch.setattr(trainproc, "RING_MAX_BYTES", 0)  # no ring: every batch by pipe
    torch.set_num_threads(1)
    local = _trainer(s)
    batches = [Batch(np.roll(big, i, axis=0), np.full(4096, -1)) for i in range(8)]
    expected = [local.step(b) for b in batches]

    async def main() -> list:
        remote = await ProcessTrainer.start(_trainer(s), s, in_flight=8)
        try:
            return await asyncio.gather(*(remote.run_step(b, None) for b in batches))
        finally:
            await remote.close()

    got = asyncio.run(main())
    for g, e in zip(got, expected, strict=True):  # all trained, in the order asked for
        np.testing.assert_array_equal(g.served_labels, e.served_labels)


class _FiresOnce(CollapseGuard):
    """A guard that fires on the first batch it judges, and never again."""

    def __init__(self) -> None:
        super().__init__(0.0, 1)
        self.judged = 0

    def observe_labels(self, labels: np.ndarray, n_clusters: int) -> bool:
        self.judged += 1
        return self.judged == 1


def test_steps_in_flight_at_a_restore_train_the_restored_weights(tmp_path):
    """The guard fires on the first reply while three more steps are queued in the child:
    the restore goes after them, so they trained the replaced weights; each is sent again
    and the restored model holds all three (and not the first, collapsed, one)."""
    X, _ = datasets.load("digits")
    X = X.astype(np.float32)
    s = _settings(tmp_path)
    healthy = fresh_model(s, "cpu").partial_fit(X[:64]).to_snapshot(offsets={"t:0": 1})
    base = Trainer(fresh_model(s, "cpu"), _FiresOnce(), WorkerMetrics(), healthy=healthy)
    batches = [Batch(X[64 * i:64 * (i + 1)], np.full(64, -1)) for i in range(1, 5)]

    async def main() -> tuple[list, int, bool]:
        remote = await ProcessTrainer.start(base, s, in_flight=4)
        try:
            reports = await asyncio.gather(*(remote.run_step(b, None) for b in batches))
            return reports, remote.describe()["samples_seen"], remote.can_snapshot
        finally:
            await remote.close(export=False)

    reports, seen, can_snapshot = asyncio.run(main())
    assert all(r is not None for r in reports) and base.guard.judged == 4
    assert seen == healthy.meta.samples_seen + 3 * 64  # batches 2-4, after the restore
    assert can_snapshot  # a step on the restored weights was judged


def test_a_killed_training_process_fails_the_worker_and_frees_the_ring(tmp_path):
    X, _ = datasets.load("digits")
    batch = Batch(X[:64].astype(np.float32), np.full(64, -1))
    s = _settings(tmp_path)

    async def main() -> tuple[BaseException | None, BaseException | None]:
        remote = await ProcessTrainer.start(_trainer(s), s, in_flight=2)
        try:
            await remote.run_step(batch, None)
            assert _rings(os.getpid())
            os.kill(remote.proc.proc.pid, signal.SIGKILL)
            with pytest.raises(TrainProcessDied, match="died"):
                await asyncio.wait_for(remote.run_step(batch, None), 30)
        finally:
            await remote.proc.shutdown()
        return remote.failure, remote.proc.proc.exitcode

    failure, code = asyncio.run(main())
    assert isinstance(failure, TrainProcessDied)
    assert code == -signal.SIGKILL
    assert not _rings(os.getpid())


EXIT_WITHOUT_SHUTDOWN = """
import asyncio, os, sys
import numpy as np
from oclust.training_worker.batching import Batch
from oclust.training_worker.monitor import CollapseGuard, WorkerMetrics
from oclust.training_worker.resume import fresh_model
from oclust.training_worker.settings import WorkerSettings
from oclust.training_worker.trainer import Trainer
from oclust.training_worker.trainproc import ProcessTrainer

async def main() -> None:
    s = WorkerSettings(n_clusters=2, latent_dim=4, batch_size=8, device="cpu",
                       store="file://" + sys.argv[1], metrics_port=-1)
    base = Trainer(fresh_model(s, "cpu"), CollapseGuard(0.0, 5), WorkerMetrics())
    remote = await ProcessTrainer.start(base, s, in_flight=2)
    await remote.run_step(Batch(np.ones((8, 3), np.float32), np.full(8, -1)), None)
    print(remote.proc.proc.pid, os.getpid(), flush=True)  # and return without closing it

asyncio.run(main())
"""


def test_an_interpreter_exiting_without_shutdown_neither_hangs_nor_leaks(tmp_path):
    proc = subprocess.run([sys.executable, "-c", EXIT_WITHOUT_SHUTDOWN, str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    child, pid = map(int, proc.stdout.split())
    assert _wait_gone(child, timeout=5)
    assert not _rings(pid)


def _train_pid(log: Path) -> int:
    return int(re.findall(r"training in process (\d+)", log.read_text())[-1])


def _stop_training_midstream(bootstrap: str, topic: str, redis_url: str, log: Path, sig: int,
                             wait: float) -> tuple[int, float, int]:
    """A worker (snapshots every 0.2 s) whose training process gets ``sig`` mid-stream must exit
    1 within ``wait`` s, commit nothing past its last snapshot and leave no ring: the child's pid,
    the seconds the worker took to exit, and the last snapshot's offset."""
    store = open_store(redis_url, "p", keep=None)
    proc = _worker(bootstrap, topic, redis_url, log, -1, snapshot_interval=0.2)
    producer = None
    try:
        _wait_for_offset(store, topic, FIRST, proc, log)
        producer = _produce_in_background(bootstrap, topic, N_DIGITS, rate=1000)
        _wait_for_offset(store, topic, FIRST + 200, proc, log)
        child = _train_pid(log)
        os.kill(child, sig)
        t0 = time.monotonic()
        assert proc.wait(timeout=wait) == 1, log.read_text()[-3000:]
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        if producer is not None:
            producer.join(timeout=30)
    assert "the training process" in log.read_text()
    assert not _rings(proc.pid)
    snaps = [store.load(v) for v in store.versions()]
    last = snaps[-1].manifest["offsets"][f"{topic}:0"]
    committed = asyncio.run(committed_offsets(bootstrap, "oclust-p", topic))[0]
    assert committed is not None and committed <= last  # commit after snapshot, still
    assert all(s.manifest["samples_seen"] == s.manifest["offsets"][f"{topic}:0"] for s in snaps)
    return child, took, last


@pytest.mark.timeout(240)
def test_training_process_killed_worker_killed_then_sigterm(
    kafka_bootstrap, redis_url, unique_topic, tmp_path
):
    store = open_store(redis_url, "p", keep=None)
    log = tmp_path / "worker.log"
    asyncio.run(replay(kafka_bootstrap, unique_topic, "digits", limit=FIRST, progress=False))
    total = FIRST + N_DIGITS

    # run 1: the training process dies mid-stream: the worker fails at once (exit 1)
    _, took, last = _stop_training_midstream(kafka_bootstrap, unique_topic, redis_url, log,
                                             signal.SIGKILL, wait=30)
    assert took < 15

    # run 2: kill -9 of the worker: its training process exits by itself and unlinks the ring
    # (mid-stream again: N_DIGITS more messages come at 1000/s)
    proc = _worker(kafka_bootstrap, unique_topic, redis_url, log, -1, snapshot_interval=0.2)
    producer = None
    try:
        _wait_for_offset(store, unique_topic, last + 1, proc, log)
        producer = _produce_in_background(kafka_bootstrap, unique_topic, N_DIGITS, rate=1000)
        _wait_for_offset(store, unique_topic, total + 200, proc, log)
        child = _train_pid(log)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        if producer is not None:
            assert producer.is_alive(), "the stream ended before the kill: not mid-stream"
            producer.join(timeout=30)
    assert _wait_gone(child), "the orphaned training process kept running"
    total += N_DIGITS
    assert not _rings(proc.pid)

    # run 3: SIGTERM: final snapshot of everything, committed, training process gone
    before = store.load().manifest["offsets"][f"{unique_topic}:0"]
    assert before < total
    proc = _train_then_sigterm(kafka_bootstrap, unique_topic, redis_url, log, total - before)
    assert _wait_gone(_train_pid(log), timeout=5)
    assert not _rings(proc.pid)
    final = store.load().manifest
    assert final["offsets"] == {f"{unique_topic}:0": total}
    assert final["samples_seen"] == total  # resumed from snapshots: each message once
    committed = asyncio.run(committed_offsets(kafka_bootstrap, "oclust-p", unique_topic))[0]
    assert committed == total
