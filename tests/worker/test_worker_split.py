"""The worker's split parts: consumer Protocol, offset ledger, ingest strategies (real stores)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from oclust.training_worker.ingest import ReadingIngest, SampleIngest, make_ingest
from oclust.training_worker.lease import make_progress_log
from oclust.training_worker.ledger import OffsetLedger
from oclust.training_worker.settings import WorkerSettings
from oclust.training_worker.store import open_store
from oclust.training_worker.stream import Consumer, LocalStream, Producer


def _msg(offset: int, value: bytes, partition: int = 0, key: bytes | None = None):
    return SimpleNamespace(topic="t", partition=partition, offset=offset, key=key, value=value,
                           headers=[])


def _sample(features: list[float]) -> bytes:
    return json.dumps({"features": features}).encode()


def test_aiokafka_and_the_in_process_clients_satisfy_one_protocol() -> None:
    async def clients() -> list[object]:
        kafka = [AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1"),
                 AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")]
        stream = LocalStream()
        return [*kafka, stream.consumer("g"), stream.producer()]

    kafka_consumer, kafka_producer, local_consumer, local_producer = asyncio.run(clients())
    assert isinstance(kafka_consumer, Consumer) and isinstance(local_consumer, Consumer)
    assert isinstance(kafka_producer, Producer) and isinstance(local_producer, Producer)
    assert not isinstance(local_producer, Consumer)


def test_local_consumer_reports_bounds_and_seeks() -> None:
    async def run() -> tuple[dict, dict, list[int]]:
        stream = LocalStream()
        stream.start_at("t", 10)
        producer, consumer = stream.producer(), stream.consumer("g")
        for i in range(3):
            await producer.send_and_wait("t", str(i).encode())
        consumer.subscribe(["t"])
        await consumer.start()
        tp = TopicPartition("t", 0)
        bounds = (await consumer.beginning_offsets([tp]), await consumer.end_offsets([tp]))
        consumer.seek(tp, 11)
        got = await consumer.getmany(timeout_ms=100)
        return bounds[0], bounds[1], [r.offset for r in got[tp]]

    start, end, offsets = asyncio.run(run())
    assert list(start.values()) == [10] and list(end.values()) == [13]
    assert offsets == [11, 12]


def test_ledger_marks_what_is_in_hand_and_shrinks_it_after_a_snapshot(tmp_path: Path) -> None:
    progress = make_progress_log(open_store(f"file://{tmp_path}", namespace="ns"))
    ledger = OffsetLedger("t", {"t:0": 5}, progress)
    ledger.skip_below[0] = 5
    msgs = [_msg(o, b"") for o in range(3, 9)]
    assert [m.offset for m in ledger.unseen(0, msgs)] == [5, 6, 7, 8]
    ledger.mark({0: 9}, {0: 5})
    assert progress.read() == {"t:0": (5, 9)}
    ledger.fetched(0, 9)
    assert ledger.covered({0: 8}) == {"t:0": 8}  # offset 8 waits in the queue
    ledger.checkpoint = {"t:0": 8}
    ledger.shrink_marks({"t:0": 8})
    assert progress.read() == {"t:0": (8, 9)}
    ledger.forget_partitions({0})
    assert ledger.covered({}) == {"t:0": 8}  # the checkpoint stays, the fetch position goes


def test_ledger_isolates_a_span_that_killed_two_holders_then_finds_the_poison(
    tmp_path: Path,
) -> None:
    store = open_store(f"file://{tmp_path}", namespace="ns")
    progress = make_progress_log(store)
    progress.mark({"t:0": (4, 8)})
    recoveries = []
    for _ in range(2):  # two holders died with 4..7 in hand
        ledger = OffsetLedger("t", {"t:0": 4}, progress, max_attempts=2)
        ledger.read_crash_marks(lambda: recoveries.append(1))
    assert ledger.isolate == {0: (4, 8)} and len(recoveries) == 2
    runs = ledger.split_suspects(0, [_msg(o, b"") for o in range(3, 6)])
    assert [[m.offset for m in run] for run in runs] == [[3], [4], [5]]
    for _ in range(2):  # then offset 6, marked alone, killed two more
        progress.mark({"t:0": (6, 7)})
        ledger = OffsetLedger("t", {"t:0": 4}, progress, max_attempts=2)
        ledger.read_crash_marks()
    assert ledger.poison == {0: 6} and ledger.is_poison(_msg(6, b""))
    ledger.skipped_poison(_msg(6, b""))
    assert ledger.poison == {}


def test_sample_ingest_queues_good_rows_with_their_offsets_and_returns_rejects() -> None:
    ingest = make_ingest(WorkerSettings(topic="t", store="file:///tmp/unused"), (2,))
    assert isinstance(ingest, SampleIngest)
    msgs = [_msg(10, _sample([1.0, 2.0])), _msg(11, _sample([1.0, 2.0, 3.0])),
            _msg(12, _sample([3.0, 4.0]))]
    rejects = ingest.decode(0, msgs)
    assert [(m.offset, err.reason) for m, err in rejects] == [(11, "wrong_length")]
    assert len(ingest.queue) == 2 and ingest.pending() == {0: 10}
    batch = ingest.queue.take(2)
    np.testing.assert_array_equal(batch.x, [[1.0, 2.0], [3.0, 4.0]])
    assert ingest.pending() == {}


def test_reading_ingest_pins_windows_and_counts_buffered_readings_as_pending() -> None:
    settings = WorkerSettings(topic="t", store="file:///tmp/unused", mode="readings",
                              window_size=2, window_hop=2)
    ingest = make_ingest(settings, None)
    assert isinstance(ingest, ReadingIngest)
    reading = [json.dumps({"device": "d", "ts": i, "values": [float(i)]}).encode()
               for i in range(3)]
    rejects = ingest.decode(0, [_msg(20 + i, v, key=b"d") for i, v in enumerate(reading)]
                            + [_msg(23, b"not json", key=b"d")])
    assert [m.offset for m, _ in rejects] == [23]
    assert len(ingest.queue) == 1  # readings 20, 21 make a window; 22 waits in the buffer
    ingest.queue.take(1)
    assert ingest.pending() == {0: 22}
    ingest.forget_partitions({0})
    assert ingest.pending() == {}


def test_readings_mode_refuses_a_model_of_another_window_size() -> None:
    settings = WorkerSettings(topic="t", store="file:///tmp/unused", mode="readings",
                              window_size=4)
    with pytest.raises(ValueError, match="window-size 4"):
        make_ingest(settings, (3, 8))
