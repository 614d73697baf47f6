"""An in-process stream for the embedded mode (``oclust up``) and for unit tests.

:class:`LocalStream` keeps one append-only log per topic (one partition, 0) in memory and hands
out producers and consumers with the small part of the aiokafka API the replay producer and
the training worker use (``start``/``stop``, ``send``, ``subscribe``, ``getmany``,
``highwater``, ``assignment``, ``commit``), so the worker runs the same code on it as on Kafka:
:class:`Consumer` and :class:`Producer` are that API as Protocols, satisfied by aiokafka's
clients and by this module's alike.
Consumer groups keep committed offsets; a new consumer of a group starts there (or at the
beginning). Records every group has committed are dropped, and a topic marked with
:meth:`LocalStream.bound` makes producers wait while its consumers lag by more than
``max_backlog`` records, so an endless replay never outgrows memory.

Example:
    >>> import asyncio
    >>> async def demo() -> list[bytes]:
    ...     stream = LocalStream()
    ...     producer, consumer = stream.producer(), stream.consumer("g")
    ...     await producer.send_and_wait("t", b"hello")
    ...     consumer.subscribe(["t"])
    ...     await consumer.start()
    ...     got = await consumer.getmany(timeout_ms=100)
    ...     return [r.value for records in got.values() for r in records]
    >>> asyncio.run(demo())
    [b'hello']
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from aiokafka import TopicPartition

__all__ = ["Consumer", "LocalConsumer", "LocalProducer", "LocalRecord", "LocalStream", "Producer",
           "Record"]


class Record(Protocol):
    """One consumed message: aiokafka's ``ConsumerRecord`` or a :class:`LocalRecord`."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@runtime_checkable
class Consumer(Protocol):
    """What the worker asks of a consumer: ``AIOKafkaConsumer`` and :class:`LocalConsumer`.

    Example:
        >>> isinstance(LocalStream().consumer("g"), Consumer)
        True
    """

    def subscribe(self, topics: Iterable[str], *, listener: Any = None) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...
    def highwater(self, tp: TopicPartition) -> int | None: ...
    async def getmany(self, *, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[Any]]: ...
    async def commit(self, offsets: dict[TopicPartition, int]) -> None: ...
    async def beginning_offsets(self, partitions: list[TopicPartition]
                                ) -> dict[TopicPartition, int]: ...
    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    def seek(self, tp: TopicPartition, offset: int) -> None: ...


@runtime_checkable
class Producer(Protocol):
    """What the worker asks of a producer: ``AIOKafkaProducer`` and :class:`LocalProducer`."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> Any: ...


@dataclass(frozen=True)
class LocalRecord:
    """One stored message, with the attributes of an aiokafka ``ConsumerRecord``."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int


@dataclass
class _Log:
    base: int = 0  # offset of records[0]
    continues: int | None = None  # the snapshot version whose offsets it continues
    records: list[LocalRecord] = field(default_factory=list)
    max_backlog: int | None = None

    @property
    def end(self) -> int:
        return self.base + len(self.records)


class LocalStream:
    """Topics, committed offsets and the condition every producer and consumer waits on."""

    def __init__(self) -> None:
        self._logs: dict[str, _Log] = {}
        self._committed: dict[str, dict[str, int]] = {}  # group -> topic -> next offset
        self._positions: dict[int, tuple[str, int]] = {}  # id(consumer) -> (topic, position)
        self._changed: asyncio.Condition | None = None

    # ------------------------------------------------------------------ public
    def producer(self) -> LocalProducer:
        """A producer writing to this stream."""
        return LocalProducer(self)

    def consumer(self, group_id: str, auto_offset_reset: str = "earliest") -> LocalConsumer:
        """A consumer in ``group_id`` (one partition per topic: the group has one reader)."""
        return LocalConsumer(self, group_id, auto_offset_reset)

    def bound(self, topic: str, max_backlog: int) -> None:
        """Make producers of ``topic`` wait while a reader lags by more than ``max_backlog``."""
        self._log(topic).max_backlog = max_backlog

    def start_at(self, topic: str, offset: int, group_id: str | None = None,
                 snapshot: int | None = None) -> None:
        """Let an empty ``topic`` begin at ``offset`` (and ``group_id`` have committed it).

        The embedded mode resumes this way: a new in-process stream continues the offsets
        of the snapshot it resumes from (version ``snapshot``), so nothing new looks already
        trained.
        """
        log = self._log(topic)
        if log.records:
            raise ValueError(f"topic {topic!r} already holds records")
        log.base = offset
        log.continues = snapshot
        if group_id is not None:
            self._committed.setdefault(group_id, {})[topic] = offset

    def continues(self, topic: str, version: int) -> bool:
        """``topic`` was made to continue the offsets of snapshot ``version`` (``start_at``):
        its records are new, whatever that snapshot says it held of the old stream's records
        beyond its offsets (a later snapshot's account is of this stream's records)."""
        return self._log(topic).continues == version

    def end_offset(self, topic: str) -> int:
        """The next offset to be written to ``topic``."""
        return self._log(topic).end

    def committed(self, group_id: str, topic: str) -> int | None:
        """The group's committed offset of ``topic`` (``None``: nothing committed)."""
        return self._committed.get(group_id, {}).get(topic)

    # ------------------------------------------------------------------ internals
    def _log(self, topic: str) -> _Log:
        return self._logs.setdefault(topic, _Log())

    @property
    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # created lazily: it belongs to the running loop
            self._changed = asyncio.Condition()
        return self._changed

    async def _append(self, topic: str, key: bytes | None, value: bytes | None,
                      headers: list[tuple[str, bytes]]) -> int:
        log = self._log(topic)
        async with self._cond:
            if log.max_backlog is not None:  # backpressure on a bounded topic
                await self._cond.wait_for(lambda: log.end - self._slowest(topic) < log.max_backlog)
            offset = log.end
            log.records.append(LocalRecord(topic, 0, offset, key, value, list(headers),
                                           int(time.time() * 1000)))
            self._cond.notify_all()
        return offset

    def _slowest(self, topic: str) -> int:
        """Lowest read position of the topic's consumers (its start when none reads it)."""
        positions = [p for t, p in self._positions.values() if t == topic]
        return min(positions) if positions else self._log(topic).base

    def _commit(self, group_id: str, topic: str, offset: int) -> None:
        self._committed.setdefault(group_id, {})[topic] = offset
        log = self._log(topic)  # drop what every group has committed and no reader still needs
        keep_from = min([c[topic] for c in self._committed.values() if topic in c]
                        + [p for t, p in self._positions.values() if t == topic])
        if keep_from > log.base:
            del log.records[: keep_from - log.base]
            log.base = keep_from


class LocalProducer:
    """``send`` / ``send_and_wait`` / ``flush`` like ``AIOKafkaProducer``; always acknowledged."""

    def __init__(self, stream: LocalStream) -> None:
        self.stream = stream

    async def start(self) -> None:
        """Nothing to connect to."""

    async def stop(self) -> None:
        """Nothing to close."""

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future[int]:
        """Append the message (waiting on backpressure); returns a done future of its offset."""
        offset = await self.stream._append(topic, key, value, headers or [])
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        fut.set_result(offset)
        return fut

    async def send_and_wait(self, topic: str, value: bytes | None = None,
                            key: bytes | None = None,
                            headers: list[tuple[str, bytes]] | None = None) -> int:
        """Append the message and return its offset."""
        return await (await self.send(topic, value, key, headers))

    async def flush(self) -> None:
        """Every send is acknowledged at once."""


class LocalConsumer:
    """The consumer API the worker uses: one partition (0) per subscribed topic."""

    def __init__(self, stream: LocalStream, group_id: str, auto_offset_reset: str) -> None:
        self.stream = stream
        self.group_id = group_id
        self.auto_offset_reset = auto_offset_reset
        self._topic: str | None = None
        self._listener: Any = None
        self._position = 0

    def subscribe(self, topics: Iterable[str], listener: Any = None) -> None:
        """Read ``topics`` (exactly one); ``listener`` hears the assignment on ``start``."""
        (self._topic,) = list(topics)
        self._listener = listener

    async def start(self) -> None:
        """Take partition 0 at the group's committed offset (else earliest or latest)."""
        if self._topic is None:
            raise RuntimeError("subscribe() before start()")
        log = self.stream._log(self._topic)
        committed = self.stream.committed(self.group_id, self._topic)
        if committed is not None:
            self._position = max(committed, log.base)
        else:
            self._position = log.base if self.auto_offset_reset == "earliest" else log.end
        self.stream._positions[id(self)] = (self._topic, self._position)
        if self._listener is not None:
            await self._listener.on_partitions_assigned(self.assignment())

    async def stop(self) -> None:
        """Leave: producers no longer wait for this reader."""
        self.stream._positions.pop(id(self), None)
        async with self.stream._cond:
            self.stream._cond.notify_all()

    def assignment(self) -> set[TopicPartition]:
        """``{TopicPartition(topic, 0)}`` once started."""
        return {TopicPartition(self._topic, 0)} if self._topic is not None else set()

    def highwater(self, tp: TopicPartition) -> int:
        """The end offset of the partition."""
        return self.stream.end_offset(tp.topic)

    async def getmany(self, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[LocalRecord]]:
        """Records from the position on, waiting up to ``timeout_ms`` for the first one."""
        assert self._topic is not None
        log = self.stream._log(self._topic)
        cond = self.stream._cond
        async with cond:
            if log.end <= self._position and timeout_ms > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cond.wait_for(lambda: log.end > self._position),
                                           timeout_ms / 1000)
            start = max(self._position, log.base) - log.base
            stop = len(log.records) if max_records is None else start + max_records
            records = log.records[start:stop]
            if not records:
                return {}
            self._position = records[-1].offset + 1
            self.stream._positions[id(self)] = (self._topic, self._position)
            cond.notify_all()  # a bounded topic's producers may go on
        return {TopicPartition(self._topic, 0): records}

    async def beginning_offsets(self, partitions: list[TopicPartition]
                                ) -> dict[TopicPartition, int]:
        """The first offset each partition still holds."""
        return {tp: self.stream._log(tp.topic).base for tp in partitions}

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The next offset to be written to each partition."""
        return {tp: self.stream.end_offset(tp.topic) for tp in partitions}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` on (the next ``getmany``)."""
        self._position = offset
        self.stream._positions[id(self)] = (tp.topic, offset)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Store the group's offsets (the next offset to read, as in Kafka)."""
        for tp, offset in offsets.items():
            self.stream._commit(self.group_id, tp.topic, offset)
