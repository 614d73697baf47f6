"""What a snapshot holds beyond its offsets is never trained twice after a restart.

Readings mode: the committed offset stops at the oldest reading still in some device's buffer,
so readings above it that went into trained windows are replayed after a restart; the snapshot
lists the readings that still wait, and the resumed worker decodes only those. (Samples mode,
a multi-sample message cut between two batches: ``tests/worker/test_multisample.py``.)
In-process stream and directory store: the logic above the broker and the store.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from oclust.model.snapshot import Manifest
from oclust.training_worker.codec import encode_reading
from oclust.training_worker.settings import WorkerSettings
from oclust.training_worker.store import StoreError, open_store
from oclust.training_worker.stream import LocalStream
from oclust.training_worker.trainer import TrainerHooks
from oclust.training_worker.worker import TrainingWorker
from tests.worker.test_worker import _run_until


def _settings(tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(
        topic="t", store=f"file://{tmp_path}", namespace="ns", mode="readings", window_size=10,
        n_clusters=2, batch_size=4, batch_timeout=0.01, snapshot_interval=3600, metrics_port=-1,
        train_process=False, seed=0, device="cpu",
    )


async def _until(done: Any) -> None:
    """Wait for a condition of the running worker (polled: it has no event for it)."""
    async with asyncio.timeout(30):
        while not done():
            await asyncio.sleep(0.01)


def _store_down(*_args: Any, **_kw: Any) -> int:
    raise StoreError("the store is down")


def _whole_and_resumed(readings: list[tuple[str, float | None]], assembler: Any,
                       interrupt: int, trained: int, fetch: int = 1,
                       ) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The windows (their readings' offsets) trained by an uninterrupted readings ingest, and
    by one stopped after ``interrupt`` messages with ``trained`` of its windows trained (the
    rest of its queue lost: a crash after the snapshot), then resumed from that snapshot.

    ``readings``: (device, ts) per message, fetched ``fetch`` at a time; ``assembler()``: a
    fresh :class:`WindowAssembler`.
    """
    from types import SimpleNamespace as Msg

    from oclust.training_worker.batching import SampleQueue
    from oclust.training_worker.codec import ReadingDecoder
    from oclust.training_worker.ingest import ReadingIngest

    msgs = [Msg(offset=o, value=encode_reading(d, [float(o)], ts=ts)[0], headers=[], key=None)
            for o, (d, ts) in enumerate(readings)]

    def run(ingest: ReadingIngest, lo: int, hi: int) -> ReadingIngest:
        for start in range(lo, hi, fetch):
            ingest.decode(0, msgs[start : min(start + fetch, hi)])
        return ingest

    def windows(ingest: ReadingIngest, n: int | None = None) -> list[tuple[int, ...]]:
        n = len(ingest.queue) if n is None else n
        return [tuple(int(v) for v in w[0]) for w in ingest.queue.take(n).x] if n else []

    def ingest() -> ReadingIngest:
        return ReadingIngest(ReadingDecoder(), assembler(), SampleQueue())

    whole = windows(run(ingest(), 0, len(msgs)))
    first = run(ingest(), 0, interrupt)
    before = windows(first, trained)
    covered = min(interrupt, first.pending().get(0, interrupt))
    held = first.resume_state({0: covered}, {0: interrupt}).get(0)
    resumed = ingest()
    resumed.resume_from(0, covered, held)
    return whole, before + windows(run(resumed, covered, len(msgs)))


def test_windows_trained_above_a_slow_devices_offset_are_not_trained_again(tmp_path) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 3)).astype(np.float32)  # device a: one reading now, nine later
    b = rng.normal(size=(100, 3)).astype(np.float32)  # device b: ten windows at once

    async def run(stream: LocalStream, windows: int) -> list[np.ndarray]:
        trained: list[np.ndarray] = []

        def on_step(_report: Any, batch: Any) -> None:
            trained.extend(batch.x)

        worker = TrainingWorker(_settings(tmp_path), stream=stream,
                                hooks=TrainerHooks(on_step=on_step))
        assert await _run_until(worker, lambda: len(trained) >= windows) == 0  # clean stop
        return trained

    async def main() -> tuple[list[np.ndarray], Any, list[np.ndarray], Any]:
        stream = LocalStream()
        producer = stream.producer()
        await producer.send_and_wait("t", encode_reading("a", a[0], ts=0.0)[0])
        for t, row in enumerate(b):
            await producer.send_and_wait("t", encode_reading("b", row, ts=float(t))[0])
        first = await run(stream, 10)
        after_first = open_store(f"file://{tmp_path}", namespace="ns").load().meta
        for t, row in enumerate(a[1:], start=1):
            await producer.send_and_wait("t", encode_reading("a", row, ts=float(t))[0])
        second = await run(stream, 1)
        return first, after_first, second, open_store(f"file://{tmp_path}", "ns").load().meta

    first, after_first, second, last = asyncio.run(main())
    assert len(first) == 10 and after_first.samples_seen == 10
    # a's reading (offset 0) holds the offset back; the readings above it are in b's windows
    assert after_first.offsets == {"t:0": 0}
    assert after_first.offset_state == {"t:0": {"until": 101, "waiting": [[0, 1]]}}
    # the restart replays from offset 0, but trains only a's window: b's ten are not repeated
    assert len(second) == 1 and last.samples_seen == 11
    np.testing.assert_array_equal(second[0], a.T)
    assert last.offsets == {"t:0": 110} and last.offset_state == {}


def test_a_second_snapshot_before_the_replay_ends_keeps_the_first_ones_account() -> None:
    from types import SimpleNamespace as Msg

    from oclust.training_worker.batching import SampleQueue
    from oclust.training_worker.codec import ReadingDecoder, SampleDecoder, encode_matrix
    from oclust.training_worker.ingest import ReadingIngest, SampleIngest
    from oclust.training_worker.windows import WindowAssembler

    readings = ReadingIngest(ReadingDecoder(), WindowAssembler(10), SampleQueue())
    readings.resume_from(0, 0, {"until": 101, "waiting": [[0, 1], [90, 92]]})
    msgs = [Msg(offset=o, value=encode_reading("a" if o == 0 else "b", [1.0, 2.0],
                                               ts=float(o))[0], headers=[], key=None)
            for o in range(51)]
    assert readings.decode(0, msgs) == [] and len(readings.queue) == 0  # b's 1..50: skipped
    # offset 0 is buffered again; 51..100 not fetched yet: the old account of them stands
    assert readings.resume_state({0: 0}, {0: 51}) == {0: {"until": 101,
                                                          "waiting": [[0, 1], [90, 92]]}}

    # the waiting window trained again before the fetch reaches 'until': nothing waits, and
    # the manifest takes that account back (an empty span list broke every later load)
    pairs = ReadingIngest(ReadingDecoder(), WindowAssembler(2), SampleQueue())
    pairs.resume_from(0, 10, {"until": 30, "waiting": [[10, 12]]})
    msgs = [Msg(offset=o, value=encode_reading("a" if o < 12 else "b", [1.0, 2.0],
                                               ts=float(o))[0], headers=[], key=None)
            for o in range(10, 20)]
    assert pairs.decode(0, msgs) == [] and len(pairs.queue.take(1)) == 1  # a's window only
    state = pairs.resume_state({0: 20}, {0: 20})
    assert state == {0: {"until": 30, "waiting": []}}
    assert Manifest.from_dict({"offset_state": {"t:0": state[0]}}).offset_state["t:0"] == state[0]

    samples = SampleIngest(SampleDecoder(), SampleQueue())
    samples.resume_from(0, 5, {"rows": 2})
    assert samples.resume_state({0: 5}, {}) == {0: {"rows": 2}}  # message 5 not fetched yet
    value, headers = encode_matrix(np.arange(8, dtype=np.float32).reshape(4, 2))
    samples.decode(0, [Msg(offset=5, value=value, headers=headers)])
    assert samples.queue.take(4).x[:, 0].tolist() == [4.0, 6.0]  # its first 2 rows skipped
    assert samples.resume_state({0: 6}, {0: 6}) == {}


def test_a_snapshot_offset_below_the_log_start_resumes_at_the_log_start() -> None:
    from aiokafka import TopicPartition
    from prometheus_client import CollectorRegistry

    from oclust.training_worker.resume import FaultMetrics, check_offset

    async def main() -> tuple[int | None, int | None, float | None]:
        stream = LocalStream()
        stream.start_at("t", 100)  # retention deleted 0..99
        await stream.producer().send_and_wait("t", b"x")
        consumer = stream.consumer("g")
        consumer.subscribe(["t"])
        await consumer.start()
        s = WorkerSettings(topic="t", store="file:///unused", auto_offset_reset="latest")
        faults = FaultMetrics(CollectorRegistry())
        tp = TopicPartition("t", 0)
        below = await check_offset(consumer, s, faults, tp, 50)
        inside = await check_offset(consumer, s, faults, tp, 100)
        counted = faults.registry.get_sample_value(
            "oclust_worker_offset_regressions_total", {"kind": "before_start"})
        return below, inside, counted

    below, inside, counted = asyncio.run(main())
    # a seek to 50 would be out of range, which "latest" answers with the log's end
    assert below == 100 and inside is None and counted == 1


def test_a_new_embedded_stream_trains_all_of_its_records_whatever_the_snapshot_held(
    tmp_path: Path,
) -> None:
    # `oclust up` restarted: its new in-process stream continues the snapshot's offsets with new
    # readings, so what the snapshot held beyond its offset (a slow device's window) is gone
    rng = np.random.default_rng(0)
    s = _settings(tmp_path)

    async def run(stream: LocalStream, windows: int) -> list[np.ndarray]:
        trained: list[np.ndarray] = []
        hooks = TrainerHooks(on_step=lambda _r, batch: trained.extend(batch.x))
        worker = TrainingWorker(s, stream=stream, hooks=hooks)
        assert await _run_until(worker, lambda: len(trained) >= windows) == 0  # clean stop
        return trained

    async def main() -> tuple[dict[str, Any], int]:
        stream = LocalStream()
        p = stream.producer()
        await p.send_and_wait("t", encode_reading("a", rng.normal(size=3), ts=0.0)[0])
        for t in range(100):
            await p.send_and_wait("t", encode_reading("b", rng.normal(size=3), ts=float(t))[0])
        await run(stream, 10)
        meta = open_store(f"file://{tmp_path}", namespace="ns").load().meta
        fresh = LocalStream()  # as oclust up starts it
        fresh.start_at("t", int(meta.offsets["t:0"]), s.consumer_group, snapshot=meta.version)
        # only that snapshot's account is of the old stream: one published later (a lease
        # taken again in the same process) holds this stream's records, and is kept
        assert fresh.continues("t", meta.version) and not fresh.continues("t", meta.version + 1)
        p = fresh.producer()
        for t in range(100):
            await p.send_and_wait("t", encode_reading("c", rng.normal(size=3), ts=float(t))[0])
        return meta.offset_state, len(await run(fresh, 10))

    held, second = asyncio.run(main())
    assert held["t:0"]["until"] > 1  # the first run's snapshot held readings beyond its offset
    assert second == 10  # was 0: every new reading skipped as already trained


def test_a_rebalance_whose_checkpoint_fails_keeps_what_moved_beyond_a_pinned_offset(
    tmp_path: Path, monkeypatch: Any,
) -> None:
    # a slow device pins the offset at 0, so between two checkpoints only the offset_state
    # moves; a rebalance whose checkpoint fails must keep that state, or the partition, back
    # at the committed offset, replays the newer windows into the model that trained them
    from aiokafka import TopicPartition

    rng = np.random.default_rng(0)
    s = _settings(tmp_path)
    stream = LocalStream()
    trained: list[bytes] = []
    tp = TopicPartition("t", 0)

    async def send(device: str, times: range) -> None:
        for t in times:
            value = encode_reading(device, rng.normal(size=3), ts=float(t))[0]
            await stream.producer().send_and_wait("t", value)

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        hooks = TrainerHooks(on_step=lambda _r, batch: trained.extend(x.tobytes()
                                                                      for x in batch.x))
        worker = TrainingWorker(s, stream=stream, hooks=hooks)
        run = asyncio.create_task(worker.run())
        await send("a", range(1))  # the slow device: its one reading waits for ever
        await send("b", range(40))
        await _until(lambda: len(trained) == 4)
        loop = worker.active
        async with loop.lock:
            await loop.checkpoint()  # published: offset 0, b's windows held beyond it
        first = loop.store.load().meta.offset_state
        await send("b", range(40, 80))
        await _until(lambda: len(trained) == 8 and not loop.inflight)
        with monkeypatch.context() as m:
            m.setattr(loop.store, "publish", _store_down)
            await loop.on_revoked({tp})  # its checkpoint fails
        loop.consumer.seek(tp, stream.committed(s.consumer_group, "t"))  # as Kafka does
        await loop.on_assigned({tp})
        await _until(lambda: loop.ledger.consumed.get(0) == stream.end_offset("t"))
        worker.request_stop()
        assert await run == 0
        return first, loop.ledger.checkpoint_state

    first, held = asyncio.run(main())
    assert first["t:0"]["until"] == 41 and held["t:0"]["until"] == 81  # the offset stayed 0
    assert len(trained) == len(set(trained)) == 8  # b's windows 5 to 8 trained twice before


def test_dead_letters_after_a_failed_rebalance_checkpoint_are_still_published(
    tmp_path: Path, monkeypatch: Any,
) -> None:
    # the offsets kept at the failed checkpoint are not published ones: the final snapshot
    # must still publish and commit the dead letters' offsets, with no training step since
    from aiokafka import TopicPartition

    from oclust.training_worker.codec import encode_sample

    s = _settings(tmp_path).model_copy(update={"mode": "samples", "batch_size": 10})
    stream = LocalStream()
    tp = TopicPartition("t", 0)

    async def main() -> tuple[dict[str, int], int | None]:
        producer = stream.producer()
        for x in np.random.default_rng(0).normal(size=(20, 4)):
            await producer.send_and_wait("t", encode_sample(x)[0])
        worker = TrainingWorker(s, stream=stream)
        run = asyncio.create_task(worker.run())
        await _until(lambda: worker.active is not None and worker.trainer.model.is_fitted
                    and worker.active.ledger.consumed.get(0) == 20 and not worker.active.inflight)
        loop = worker.active
        async with loop.lock:
            await loop.checkpoint()  # published at 20
        for _ in range(5):
            await producer.send_and_wait("t", b"not json")  # dead letters: no step
        await _until(lambda: loop.ledger.consumed.get(0) == 25)
        with monkeypatch.context() as m:
            m.setattr(loop.store, "publish", _store_down)
            await loop.on_revoked({tp})  # its checkpoint fails; the store is back after
        loop.consumer.seek(tp, stream.committed(s.consumer_group, "t"))
        await loop.on_assigned({tp})
        await _until(lambda: loop.ledger.consumed.get(0) == 25)
        worker.request_stop()
        assert await run == 0
        return loop.store.load().meta.offsets, stream.committed(s.consumer_group, "t")

    offsets, committed = asyncio.run(main())
    assert offsets == {"t:0": 25} and committed == 25  # was 20: taken for nothing new


def test_a_resumed_worker_with_gaps_between_windows_loses_no_waiting_window() -> None:
    # windows of 2 readings every 5: a resume replays only the waiting readings, so the gap
    # counter of the first re-formed window swallowed the next waiting one (trained never,
    # committed still)
    from types import SimpleNamespace as Msg

    from oclust.training_worker.batching import SampleQueue
    from oclust.training_worker.codec import ReadingDecoder
    from oclust.training_worker.ingest import ReadingIngest
    from oclust.training_worker.windows import WindowAssembler

    def msgs(lo: int, hi: int) -> list[Msg]:  # channel 0 names the reading's offset
        return [Msg(offset=o, value=encode_reading("d", [float(o), 1.0], ts=float(o))[0],
                    headers=[], key=None) for o in range(lo, hi)]

    def ingest() -> ReadingIngest:
        return ReadingIngest(ReadingDecoder(), WindowAssembler(2, hop=5), SampleQueue())

    def firsts(queue: SampleQueue) -> list[int]:
        return [int(w[0, 0]) for w in queue.take(len(queue)).x]

    whole = ingest()
    whole.decode(0, msgs(0, 40))
    expected = firsts(whole.queue)
    assert expected == [0, 5, 10, 15, 20, 25, 30, 35]

    first = ingest()
    first.decode(0, msgs(0, 27))
    assert [int(w[0, 0]) for w in first.queue.take(4).x] == [0, 5, 10, 15]  # trained
    held = first.resume_state({0: 20}, {0: 27})[0]  # what a checkpoint then records
    assert held == {"until": 27, "waiting": [[20, 22], [25, 27]]}  # two windows still queued
    resumed = ingest()
    resumed.resume_from(0, 20, held)
    resumed.decode(0, msgs(20, 40))
    assert firsts(resumed.queue) == [20, 25, 30, 35]  # 25 was lost

    # the fetch ended inside the gap after a waiting window: the gap's replayed readings
    # close it again (they were dropped by the replay, and the gap then took 25 and 26)
    first = ingest()
    first.decode(0, msgs(0, 24))
    first.queue.take(4)
    held = first.resume_state({0: 20}, {0: 24})[0]
    assert held == {"until": 24, "waiting": [[20, 22]]}
    resumed = ingest()
    resumed.resume_from(0, 20, held)
    resumed.decode(0, msgs(20, 40))
    assert firsts(resumed.queue) == [20, 25, 30, 35]  # was [20, 27, 32, 37]


def test_a_failing_channel_settle_never_stops_the_readings_ingest(monkeypatch: Any) -> None:
    from types import SimpleNamespace as Msg

    from oclust.training_worker.batching import SampleQueue
    from oclust.training_worker.codec import ReadingDecoder
    from oclust.training_worker.ingest import ReadingIngest
    from oclust.training_worker.windows import WindowAssembler

    def broken(*_args: Any) -> None:
        raise RuntimeError("a decoder bug")

    monkeypatch.setattr(ReadingDecoder, "settle_channels", broken)
    ingest = ReadingIngest(ReadingDecoder(), WindowAssembler(2), SampleQueue())
    msgs = [Msg(offset=o, value=encode_reading("d", [1.0, 2.0], ts=float(o))[0], headers=[],
                key=None) for o in range(4)]
    assert ingest.decode(0, msgs) == [] and len(ingest.queue) == 2  # each message judged


def test_a_resumed_worker_keeps_an_idle_devices_waiting_window_until_it_forms_again() -> None:
    # the replay passes over trained readings, so its idle checks fell elsewhere than the
    # first run's; a device whose buffer held a waiting window's first reading was dropped as
    # idle, and that window was committed, never trained
    from types import SimpleNamespace as Msg

    from oclust.training_worker.batching import SampleQueue
    from oclust.training_worker.codec import ReadingDecoder
    from oclust.training_worker.ingest import ReadingIngest
    from oclust.training_worker.windows import WindowAssembler

    devices = ["d1", "d0", "d1", "d0", "d0", "d1", "d1"]
    whole, resumed = _whole_and_resumed([(d, float(o)) for o, d in enumerate(devices)],
                                        lambda: WindowAssembler(2, hop=1, idle_after=2),
                                        interrupt=6, trained=1)
    assert whole == resumed == [(0, 2), (1, 3), (3, 4), (5, 6)]  # d1 idle at 4: (2, 5) never

    # with several partitions the replay's pushes come between a waiting window's readings
    # otherwise than the first run's did: the device is kept until that window forms again
    ingest = ReadingIngest(ReadingDecoder(), WindowAssembler(2, idle_after=2), SampleQueue())
    ingest.resume_from(0, 0, {"until": 2, "waiting": [[0, 2]]})  # a's window (0, 1) waits
    ingest.resume_from(1, 0, {"until": 2, "waiting": [[0, 2]]})  # and b's (100, 101)

    def msgs(partition: int, device: str, offsets: range) -> list[Msg]:
        return [Msg(offset=o, value=encode_reading(device, [100.0 * partition + o],
                                                   ts=float(o))[0], headers=[], key=None)
                for o in offsets]

    ingest.decode(0, msgs(0, "a", range(1)))
    ingest.decode(1, msgs(1, "b", range(2)))  # a received nothing during 2 pushes
    ingest.decode(0, msgs(0, "a", range(1, 2)))
    assert [tuple(w[0]) for w in ingest.queue.take(2).x] == [(100, 101), (0, 1)]


def test_a_resumed_worker_drops_idle_devices_where_the_first_run_did() -> None:
    from oclust.training_worker.windows import WindowAssembler

    # checked every idle_after pushes, counted from 0 again by the resumed worker: the checks
    # fell elsewhere, and a, holding the reading 2 of the waiting window (2, 5), went idle at
    # the first check after the replay (committed, never trained)
    readings = [("b", 1.0), ("b", 2.0), ("a", 1.0), ("b", 3.0), ("b", 4.0), ("a", 2.0)]
    whole, resumed = _whole_and_resumed(readings, lambda: WindowAssembler(2, 1, idle_after=2),
                                        interrupt=3, trained=1)
    assert whole == resumed == [(0, 1), (1, 3), (3, 4)]  # a idle at 4 (nothing at 3 and 4)

    # the replay did not count the readings it passes over: a's late reading 5 (dead-lettered)
    # kept a from going idle in the first run, not in the resumed one, and a's waiting reading
    # 3 was dropped
    readings = [("a", 0.0), ("a", 1.0), ("b", 0.0), ("a", 2.0), ("b", 1.0), ("a", 1.0),
                ("b", 2.0), ("a", 3.0)]
    whole, resumed = _whole_and_resumed(readings, lambda: WindowAssembler(2, idle_after=2),
                                        interrupt=6, trained=0)
    assert whole == resumed == [(0, 1), (2, 4), (3, 7)]


def test_a_resumed_worker_keeps_no_device_the_first_run_dropped_as_idle() -> None:
    from oclust.training_worker.windows import WindowAssembler

    # a's reading 2 is in the waiting window (0, 1, 2) and stays for the next (hop 2), until
    # a goes idle at 4; the resumed worker kept it until the replay ended, so a cut (2, 6, 7)
    # and 8, of the waiting window (6, 7, 8), went idle with 7 (committed, never trained)
    readings = [("a", 0.0), ("a", 1.0), ("a", 2.0), ("b", 0.0), ("b", 1.0), ("b", 2.0),
                ("a", 3.0), ("a", 4.0), ("a", 5.0), ("b", 3.0), ("b", 4.0), ("b", 5.0),
                ("b", 6.0)]
    whole, resumed = _whole_and_resumed(readings, lambda: WindowAssembler(3, 2, idle_after=2),
                                        interrupt=9, trained=0)
    assert whole == resumed == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]

    # the replay ended with the fetch that reached past it, not where it did: a's waiting
    # reading 0 was kept through the new readings 1 to 3, then a cut (0, 4), and 5 went idle
    readings = [("a", 0.0), ("b", 0.0), ("b", 1.0), ("b", 2.0), ("a", 1.0), ("a", 2.0),
                ("b", 3.0), ("b", 4.0)]
    whole, resumed = _whole_and_resumed(readings, lambda: WindowAssembler(2, idle_after=2),
                                        interrupt=1, trained=0, fetch=8)
    assert whole == resumed == [(1, 2), (4, 5), (6, 7)]


def test_a_replayed_waiting_reading_is_never_late() -> None:
    # device d's window (100, 2) waits, made of a reading of each partition; resumed, partition
    # 0 is fetched first, d's newer readings 3 and 4 cut a window, and 100 was rejected as
    # late (dead-lettered, committed: its waiting window never formed again)
    from types import SimpleNamespace as Msg

    from oclust.training_worker.batching import SampleQueue
    from oclust.training_worker.codec import ReadingDecoder
    from oclust.training_worker.ingest import ReadingIngest
    from oclust.training_worker.windows import WindowAssembler

    ts = {(0, 0): 1.0, (0, 1): 2.0, (0, 2): 5.0, (0, 3): 6.0, (0, 4): 7.0, (1, 0): 4.0}

    def msgs(partition: int, offsets: range) -> list[Msg]:
        return [Msg(offset=o, value=encode_reading("d", [100.0 * partition + o],
                                                   ts=ts[partition, o])[0], headers=[], key=None)
                for o in offsets]

    def ingest() -> ReadingIngest:
        return ReadingIngest(ReadingDecoder(), WindowAssembler(2), SampleQueue())

    first = ingest()
    for partition, offsets in [(0, range(2)), (1, range(1)), (0, range(2, 3))]:
        assert first.decode(partition, msgs(partition, offsets)) == []
    assert [tuple(w[0]) for w in first.queue.take(1).x] == [(0, 1)]  # trained; (100, 2) waits
    covered = first.pending()
    assert covered == {0: 2, 1: 0}
    held = first.resume_state(covered, {0: 3, 1: 1})
    resumed = ingest()
    for partition in (0, 1):
        resumed.resume_from(partition, covered[partition], held[partition])
    assert resumed.decode(0, msgs(0, range(2, 5))) == []
    assert resumed.decode(1, msgs(1, range(1))) == []  # was late_reading
    assert [tuple(w[0]) for w in resumed.queue.take(2).x] == [(2, 3), (100, 4)]
