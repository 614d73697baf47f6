"""Kafka plumbing of the worker: topics, offsets, the dead-letter producer.

Dead letters go to ``<topic>.dlq`` with the original key, value and headers, plus headers
``reason`` (a code from :data:`training_worker.codec.REASONS` or ``late_reading``),
``reason_detail`` (a sentence), ``source_topic``, ``source_partition`` and ``source_offset``.

Example:
    >>> dead_letter_headers([("id", b"7")], "non_finite", "NaN in features", "t", 0, 42)[1:3]
    [('reason', b'non_finite'), ('reason_detail', b'NaN in features')]
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    OffsetOutOfRangeError,
    RecordListTooLargeError,
)

__all__ = [
    "DLQ_HEADROOM",
    "DeadLetters",
    "committed_offsets",
    "dead_letter_headers",
    "ensure_topic",
    "offset_exists",
]

TOPIC_EXISTS = 36


async def ensure_topic(bootstrap_servers: str, topic: str, partitions: int = 1) -> bool:
    """Create ``topic`` with ``partitions`` unless it exists; True when it was created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        if topic in await admin.list_topics():
            return False
        resp = await admin.create_topics([NewTopic(topic, partitions, replication_factor=1)])
        for entry in getattr(resp, "topic_errors", []):
            code = entry[1]
            if code not in (0, TOPIC_EXISTS):
                raise KafkaError(f"cannot create topic {topic!r}: error code {code} {entry}")
        return True
    finally:
        await admin.close()


async def committed_offsets(
    bootstrap_servers: str, group_id: str, topic: str
) -> dict[int, int | None]:
    """The consumer group's committed offset of each partition of ``topic``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, group_id=group_id, enable_auto_commit=False
    )
    try:  # a start that fails (no broker) still closes the client: nothing leaks
        await consumer.start()
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in sorted(parts)}
    finally:
        await consumer.stop()


async def offset_exists(
    bootstrap_servers: str, tp: TopicPartition, offset: int, timeout_ms: int = 2000
) -> bool:
    """Whether the log of ``tp`` holds a message at ``offset`` (or later), read directly.

    Confirms a suspected offset regression: a broker's reported log end can lag (Tansu
    reports the base offset of the last record batch + 1), a message read back cannot.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                                auto_offset_reset="none")
    try:
        await consumer.start()
        consumer.assign([tp])
        consumer.seek(tp, offset)
        try:
            records = await consumer.getmany(tp, timeout_ms=timeout_ms, max_records=1)
        except OffsetOutOfRangeError:
            return False
        return bool(records.get(tp))
    finally:
        await consumer.stop()


log = logging.getLogger(__name__)

DLQ_HEADERS = ("reason", "reason_detail", "source_topic", "source_partition", "source_offset")


def dead_letter_headers(
    headers: Sequence[tuple[str, bytes]] | None,
    reason: str,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
) -> list[tuple[str, bytes]]:
    """Original headers (minus any old reason) followed by the dead-letter headers."""
    kept = [(k, v) for k, v in (headers or ()) if k not in DLQ_HEADERS]
    return [
        *kept,
        ("reason", reason.encode()),
        ("reason_detail", detail.encode(errors="replace")[:1000]),
        ("source_topic", topic.encode()),
        ("source_partition", str(partition).encode()),
        ("source_offset", str(offset).encode()),
    ]


DLQ_HEADROOM = 64 * 1024  # bytes a dead letter may add to the largest accepted message
TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)  # the producer's or the broker's
Letter = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]  # key, value, headers


def _smaller(letter: Letter, stage: int) -> Letter:
    """The dead letter at ``stage``: 0 whole; 1 with an empty value; 2 with only the dead-letter
    headers, what was dropped noted by size (``value_dropped``, ``key_dropped``,
    ``headers_dropped``). Empty, not null: Kafka needs a key or a value."""
    key, value, headers = letter
    if stage == 0:
        return letter
    dropped = [("value_dropped", str(len(value or b"")).encode())]
    if stage == 1:
        return key, b"", [*headers, *dropped]
    others = sum(len(k) + len(v) for k, v in headers if k not in DLQ_HEADERS)
    return None, b"", [*((k, v) for k, v in headers if k in DLQ_HEADERS), *dropped,
                        ("key_dropped", str(len(key or b"")).encode()),
                        ("headers_dropped", str(others).encode())]


def _not_sent(letter: Letter) -> None:
    reason = dict(letter[2]).get("reason", b"?").decode(errors="replace")
    log.error("a dead letter (reason %s) is too large even with only its dead-letter headers: "
              "not sent", reason)


class DeadLetters:
    """Send rejected messages, bytes unchanged, to the dead-letter topic.

    ``send`` queues a message; ``flush`` waits until every queued one is acknowledged (the
    worker flushes before a snapshot, so committed offsets never skip an unsent dead letter).
    A dead letter too large for the producer or the broker goes with an empty value (a
    ``value_dropped`` header holds its size), and if still too large, with only the dead-letter
    headers (``key_dropped``, ``headers_dropped``): the worker never dies on one.
    """

    LAST_STAGE = 2

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self._pending: list[tuple[asyncio.Future[object], Letter, int]] = []

    async def send(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> None:
        """Queue one dead letter."""
        await self._queue((key, value, headers), 0)

    async def _queue(self, letter: Letter, stage: int) -> None:
        while True:
            key, value, headers = _smaller(letter, stage)
            try:
                fut = await self.producer.send(self.topic, value=value, key=key, headers=headers)
            except TOO_LARGE:  # over the producer's max_request_size, found before sending
                if stage == self.LAST_STAGE:
                    _not_sent(letter)
                    return
                stage += 1
                continue
            self._pending.append((fut, letter, stage))
            return

    async def flush(self) -> int:
        """Wait for all queued dead letters; return how many were sent."""
        sent = 0
        while self._pending:
            pending, self._pending = self._pending, []
            results = await asyncio.gather(*(p[0] for p in pending), return_exceptions=True)
            for (_, letter, stage), result in zip(pending, results, strict=True):
                if isinstance(result, TOO_LARGE) and stage < self.LAST_STAGE:
                    await self._queue(letter, stage + 1)  # the broker refused it: smaller
                elif isinstance(result, TOO_LARGE):
                    _not_sent(letter)
                elif isinstance(result, BaseException):
                    raise result
                else:
                    sent += 1
        return sent
