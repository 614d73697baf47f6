"""The replay producer: stream a bundled dataset into a Kafka topic as sample messages.

Vector datasets (``digits``, ``segments``, ``basic_motions``) become sample messages
``{"features", "label", "id"}`` (or float32 with headers when ``binary``, or float32 matrices
of ``samples_per_message`` samples each). ``daphnet`` is a
reading stream: it becomes reading messages ``{"device", "ts", "values", "label"}``; with
``devices=N`` the recording is cut into N contiguous parts played at the same time, as N
sensors would send them (key = device, so each device stays in order on one partition).
``hapt`` is the real reading stream of 30 users: always 30 devices ``hapt-user-01`` ..
``hapt-user-30``, each user's readings in time order with ``ts`` at 50 Hz, the users interleaved
as if they recorded at the same time (``devices`` does not apply). Labels: 0-5 the basic
activities; transitions and unlabelled readings carry no label. Real time is ``rate=1500``
(30 × 50 Hz) while all 30 users send; ``rate`` counts messages, so once the shorter recordings
end (the shortest after about 640 s) the remaining users replay faster. A higher ``rate`` or
none replays faster throughout.

Example:
    >>> msgs = list(dataset_messages("daphnet", devices=2, limit=3))
    >>> [(m.key, m.value[:22]) for m in msgs]  # doctest: +NORMALIZE_WHITESPACE
    [(b'daphnet-0', b'{"device": "daphnet-0"'), (b'daphnet-1', b'{"device": "daphnet-1"'),
     (b'daphnet-0', b'{"device": "daphnet-0"')]
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from oclust.model import datasets
from oclust.training_worker.codec import encode_matrix, encode_reading, encode_sample
from oclust.training_worker.kafka import ensure_topic
from oclust.training_worker.stream import LocalProducer, LocalStream

__all__ = ["Message", "dataset_messages", "dataset_size", "misused_option", "replay"]

DAPHNET_HZ = 64.0
READING_STREAMS = ("daphnet", "hapt")


@dataclass(frozen=True)
class Message:
    """One Kafka message to send."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def _samples(name: str, binary: bool, per_message: int = 1) -> Iterator[Message]:
    X, y = datasets.load(name)
    if per_message > 1:  # float32 matrices of up to per_message samples, labels in a header
        for start in range(0, len(X), per_message):
            value, headers = encode_matrix(X[start:start + per_message],
                                           labels=y[start:start + per_message])
            yield Message(None, value, headers)
        return
    for i, (x, label) in enumerate(zip(X, y, strict=True)):
        value, headers = encode_sample(x, label=int(label), id=f"{name}-{i}", binary=binary)
        yield Message(None, value, headers)


def _readings(devices: int, binary: bool, repeat: int = 0) -> Iterator[Message]:
    """Reading messages; pass number ``repeat`` of a loop goes on in time after the last."""
    readings, labels = datasets.load_daphnet()
    length = len(readings) // devices
    names = [f"daphnet-{d}" for d in range(devices)]
    for t in range(length):
        for d, name in enumerate(names):
            i = d * length + t
            ts = (repeat * length + t) / DAPHNET_HZ
            value, headers = encode_reading(
                name, readings[i], ts=ts, label=int(labels[i]), binary=binary
            )
            yield Message(name.encode(), value, headers)


def _hapt_readings(binary: bool, repeat: int = 0) -> Iterator[Message]:
    """The 30 HAPT users as 30 devices, one reading per user per 1/50 s tick."""
    readings, labels, users = datasets.load_hapt_readings()
    labels = np.where(labels <= 5, labels, -1)  # transitions are not one of the 6 classes
    streams = [(f"hapt-user-{u:02d}", np.flatnonzero(users == u)) for u in np.unique(users)]
    length = max(len(idx) for _, idx in streams)
    for t in range(length):
        ts = (repeat * length + t) / datasets.HAPT_HZ
        for name, idx in streams:
            if t < len(idx):
                i = idx[t]
                label = int(labels[i]) if labels[i] >= 0 else None  # unlabelled: no label field
                value, headers = encode_reading(name, readings[i], ts=ts, label=label,
                                                binary=binary)
                yield Message(name.encode(), value, headers)


def misused_option(name: str, devices: int, samples_per_message: int) -> tuple[str, str] | None:
    """``(option, why)`` when an option does not apply to dataset ``name``, else ``None``.

    >>> misused_option("hapt", 5, 1)
    ('devices', 'applies to daphnet only: hapt replays its 30 users as 30 devices')
    """
    key = name.strip().lower()
    if key in READING_STREAMS and samples_per_message > 1:
        return "samples_per_message", f"applies to sample datasets, not {key} readings"
    if key == "hapt" and devices != 1:
        return "devices", "applies to daphnet only: hapt replays its 30 users as 30 devices"
    if key not in READING_STREAMS and devices != 1:
        return "devices", f"applies to daphnet only, not to the sample dataset {name!r}"
    return None


def dataset_messages(
    name: str,
    loop: bool = False,
    limit: int | None = None,
    binary: bool = False,
    devices: int = 1,
    samples_per_message: int = 1,
) -> Iterator[Message]:
    """Messages of dataset ``name``, once or forever (``loop``), at most ``limit``.

    ``samples_per_message`` > 1 sends vector datasets as multi-sample float32 messages.
    """
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    if samples_per_message < 1:
        raise ValueError(f"samples_per_message must be at least 1, got {samples_per_message}")
    misused = misused_option(name, devices, samples_per_message)
    if misused:
        raise ValueError(" ".join(misused))
    key = name.lower()

    def one_pass(repeat: int) -> Iterator[Message]:
        if key == "daphnet":
            return _readings(devices, binary, repeat)
        if key == "hapt":
            return _hapt_readings(binary, repeat)
        return _samples(name, binary, samples_per_message)

    if key not in READING_STREAMS:
        datasets.load(name)  # fail early with the loader's clear message for unknown names
    stream = itertools.chain.from_iterable(one_pass(r) for r in itertools.count()) if loop \
        else one_pass(0)
    return itertools.islice(stream, limit) if limit is not None else stream


def dataset_size(name: str, devices: int = 1, samples_per_message: int = 1) -> int:
    """Messages in one pass over ``name`` (``samples_per_message`` samples to a message).

    >>> dataset_size("digits"), dataset_size("digits", samples_per_message=256)  # 1797 samples
    (1797, 8)
    """
    if name.lower() == "daphnet":
        return (len(datasets.load_daphnet()[0]) // devices) * devices
    if name.lower() == "hapt":
        return len(datasets.load_hapt_readings()[0])
    return -(-len(datasets.load(name)[0]) // samples_per_message)


async def replay(
    bootstrap_servers: str,
    topic: str,
    dataset: str,
    rate: float | None = None,
    limit: int | None = None,
    loop: bool = False,
    binary: bool = False,
    devices: int = 1,
    partitions: int = 1,
    progress: bool = True,
    stream: LocalStream | None = None,
    samples_per_message: int = 1,
) -> int:
    """Send dataset messages to ``topic`` (created with ``partitions`` if missing).

    ``rate`` caps messages per second. Returns how many messages were acknowledged. With
    ``stream`` (the embedded mode) the messages go to that in-process stream, not to Kafka.
    ``samples_per_message`` > 1 packs that many samples into one float32 message.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    messages = dataset_messages(dataset, loop=loop, limit=limit, binary=binary, devices=devices,
                                samples_per_message=samples_per_message)
    total = limit if limit is not None else (
        None if loop else dataset_size(dataset, devices, samples_per_message))
    producer: AIOKafkaProducer | LocalProducer
    if stream is not None:
        producer = stream.producer()
    else:
        await ensure_topic(bootstrap_servers, topic, partitions)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, linger_ms=5,
                                    max_batch_size=1 << 20)
    await producer.start()
    sent = 0
    bar = tqdm(total=total, desc=f"produce {dataset} → {topic}", unit="msg", file=sys.stderr,
               disable=not progress)
    pending: list[asyncio.Future[object]] = []
    start = time.monotonic()
    try:
        for msg in messages:
            if rate is not None:
                due = start + sent / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing to the requested rate
            pending.append(await producer.send(topic, msg.value, key=msg.key,
                                               headers=msg.headers))
            sent += 1
            bar.update(1)
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        bar.close()
        await producer.stop()
    return sent
