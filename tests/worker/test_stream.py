"""The in-process stream of the embedded mode: offsets, groups, backpressure, retention."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition

from oclust.training_worker.stream import LocalStream

TP = TopicPartition("t", 0)


async def _values(consumer: object, timeout_ms: int = 50) -> list[bytes]:
    got = await consumer.getmany(timeout_ms=timeout_ms)  # type: ignore[attr-defined]
    return [r.value for records in got.values() for r in records]


def test_records_keep_order_offsets_and_headers() -> None:
    async def main() -> None:
        stream = LocalStream()
        producer = stream.producer()
        for i in range(5):
            await producer.send_and_wait("t", str(i).encode(), key=b"k", headers=[("h", b"v")])
        consumer = stream.consumer("g")
        consumer.subscribe(["t"])
        await consumer.start()
        got = (await consumer.getmany(timeout_ms=10, max_records=3))[TP]
        assert [(r.offset, r.value, r.key, r.headers) for r in got] == [
            (i, str(i).encode(), b"k", [("h", b"v")]) for i in range(3)
        ]
        assert await _values(consumer) == [b"3", b"4"]
        assert await _values(consumer) == []  # nothing new: empty after the timeout
        assert consumer.highwater(TP) == 5

    asyncio.run(main())


def test_a_new_consumer_of_the_group_starts_at_the_commit() -> None:
    async def main() -> None:
        stream = LocalStream()
        producer = stream.producer()
        for i in range(6):
            await producer.send("t", str(i).encode())
        first = stream.consumer("g")
        first.subscribe(["t"])
        await first.start()
        await _values(first)
        await first.commit({TP: 4})
        await first.stop()
        second = stream.consumer("g")
        second.subscribe(["t"])
        await second.start()
        assert await _values(second) == [b"4", b"5"]
        latest = stream.consumer("other", auto_offset_reset="latest")
        latest.subscribe(["t"])
        await latest.start()
        assert await _values(latest) == []

    asyncio.run(main())


def test_getmany_wakes_up_when_a_record_arrives() -> None:
    async def main() -> None:
        stream = LocalStream()
        consumer = stream.consumer("g")
        consumer.subscribe(["t"])
        await consumer.start()
        waiting = asyncio.create_task(_values(consumer, timeout_ms=10_000))
        await asyncio.sleep(0)  # let it start waiting
        await stream.producer().send("t", b"x")
        assert await asyncio.wait_for(waiting, timeout=5) == [b"x"]

    asyncio.run(main())


def test_a_bounded_topic_makes_the_producer_wait_for_its_reader() -> None:
    async def main() -> None:
        stream = LocalStream()
        stream.bound("t", 3)
        consumer = stream.consumer("g")
        consumer.subscribe(["t"])
        await consumer.start()
        producer = stream.producer()

        async def produce() -> None:
            for i in range(10):
                await producer.send("t", str(i).encode())

        task = asyncio.create_task(produce())
        await asyncio.sleep(0.05)
        assert not task.done() and stream.end_offset("t") == 3  # blocked at the bound
        seen: list[bytes] = []
        while len(seen) < 10:
            seen += await _values(consumer, timeout_ms=1000)
        await asyncio.wait_for(task, timeout=5)
        assert seen == [str(i).encode() for i in range(10)]

    asyncio.run(main())


def test_committed_records_are_dropped_and_start_at_resumes_offsets() -> None:
    async def main() -> None:
        stream = LocalStream()
        stream.start_at("t", 100, group_id="g")
        producer = stream.producer()
        assert await producer.send_and_wait("t", b"a") == 100
        await producer.send_and_wait("t", b"b")
        consumer = stream.consumer("g")
        consumer.subscribe(["t"])
        await consumer.start()
        got = (await consumer.getmany(timeout_ms=10))[TP]
        assert [r.offset for r in got] == [100, 101]
        await consumer.commit({TP: 102})
        assert stream.committed("g", "t") == 102
        assert stream._log("t").records == []  # retention: everything was committed
        with pytest.raises(ValueError, match="already holds"):
            await producer.send("t", b"c")
            stream.start_at("t", 0)

    asyncio.run(main())
