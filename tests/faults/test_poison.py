"""Hostile messages never kill the worker: each goes to the DLQ with its reason.

Real Tansu broker and redis-server; the messages are the ones that crashed the worker before
(RecursionError, OverflowError, MemoryError) plus a finite 3e38 that poisoned the scaler.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from safetensors.numpy import load as load_tensors

from oclust.model import datasets
from oclust.training_worker.codec import CONTENT_TYPE_F32, encode_reading, encode_sample
from oclust.training_worker.kafka import DeadLetters, dead_letter_headers, ensure_topic
from oclust.training_worker.store import open_store
from oclust.training_worker.trainer import TrainerHooks
from oclust.training_worker.worker import DLQ_REASONS, TrainingWorker
from tests.worker.test_worker import Counter, _run_until, _settings

F32 = [("content-type", CONTENT_TYPE_F32.encode())]


def _deep(levels: int, field: str = "features") -> bytes:
    return b'{"%s": ' % field.encode() + b"[" * levels + b"1" + b"]" * levels + b"}"


def _hostile(x: np.ndarray) -> list[tuple[bytes, list[tuple[str, bytes]], str]]:
    feats = [float(v) for v in x]
    return [
        (_deep(332), [], "too_deep"),  # 681 bytes; RecursionError before
        (_deep(5000), [], "too_deep"),
        (json.dumps({"features": feats, "label": 2**63}).encode(), [], "out_of_range"),
        (np.asarray(x, "<f4").tobytes(), [*F32, ("label", b"99999999999999999999999")],
         "out_of_range"),
        (json.dumps({"features": [3e38, *feats[1:]]}).encode(), [], "out_of_range"),
        (json.dumps({"features": [10**40, *feats[1:]]}).encode(), [], "out_of_range"),
        (json.dumps({"features": [2**70, *feats[1:]]}).encode(), [], "out_of_range"),
    ]


async def _dead_letters(bootstrap: str, topic: str, n: int) -> list[Any]:
    dlq = AIOKafkaConsumer(f"{topic}.dlq", bootstrap_servers=bootstrap,
                           auto_offset_reset="earliest", enable_auto_commit=False)
    await dlq.start()
    got: list[Any] = []
    try:
        while len(got) < n:
            batch = await dlq.getmany(timeout_ms=5000)
            assert batch, f"dead letters missing: got {len(got)} of {n}"
            got += [m for msgs in batch.values() for m in msgs]
    finally:
        await dlq.stop()
    return got


def test_hostile_samples_are_dead_lettered_and_training_goes_on(
    kafka_bootstrap, redis_url, unique_topic
):
    X, y = datasets.load("digits")
    n_good = 200
    hostile = _hostile(X[0])

    async def main() -> tuple[TrainingWorker, list[Any], list[tuple[int, bytes, str]]]:
        await ensure_topic(kafka_bootstrap, unique_topic)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        expected = []
        for i in range(n_good):
            # one good message carries a wild label: trained, but ignored by live quality
            label = 10**9 if i == 100 else int(y[i])
            value, headers = encode_sample(X[i], label=label, binary=i % 2 == 1)
            await producer.send(unique_topic, value, headers=headers)
            if i % 25 == 3 and i // 25 < len(hostile):
                bad, bad_headers, reason = hostile[i // 25]
                md = await producer.send_and_wait(unique_topic, bad, headers=bad_headers)
                expected.append((md.offset, bad, reason))
        await producer.stop()
        count = Counter()
        worker = TrainingWorker(
            _settings(kafka_bootstrap, unique_topic, redis_url, batch_size=40,
                      snapshot_interval=0, quality_window=50),
            hooks=TrainerHooks(on_step=count),
        )
        reg = worker.metrics.registry
        # every DLQ series exists (at 0) before the first message
        assert all(reg.get_sample_value("oclust_worker_dlq_messages_total", {"reason": r})
                   == 0.0 for r in DLQ_REASONS)
        assert await _run_until(worker, lambda: count.samples >= n_good) == 0
        return worker, await _dead_letters(kafka_bootstrap, unique_topic, len(expected)), expected

    worker, got, expected = asyncio.run(main())
    assert len(expected) == len(hostile) == len(got)
    by_offset = {int(dict(m.headers)["source_offset"]): m for m in got}
    for offset, raw, reason in expected:
        assert by_offset[offset].value == raw
        assert dict(by_offset[offset].headers)["reason"].decode() == reason
    snap = open_store(redis_url, "t").load()
    assert snap.manifest["samples_seen"] == n_good
    assert snap.manifest["offsets"] == {f"{unique_topic}:0": n_good + len(hostile)}
    mean = load_tensors(snap.weights)["scaler.mean"]
    assert float(np.abs(mean).max()) <= 16.0  # digits pixels: no 3e38 got into the scaler
    reg = worker.metrics.registry
    assert reg.get_sample_value("oclust_worker_dlq_messages_total",
                                {"reason": "out_of_range"}) == 5
    assert reg.get_sample_value("oclust_worker_dlq_messages_total", {"reason": "too_deep"}) == 2
    assert reg.get_sample_value("oclust_worker_quality_labels_ignored_total") == 1


def test_a_bad_message_near_the_size_limit_is_a_dead_letter_not_a_dead_worker(
    kafka_bootstrap, redis_url, unique_topic
):
    X, _ = datasets.load("digits")
    n_good = 80
    big = b"x" * (1_048_576 - 200)  # under --max-message-bytes; with its reason headers, over

    async def main() -> tuple[list[Any], int]:
        await ensure_topic(kafka_bootstrap, unique_topic)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=4 << 20)
        await producer.start()
        for i in range(n_good):
            if i == n_good // 2:
                offset = (await producer.send_and_wait(unique_topic, big)).offset
            await producer.send(unique_topic, encode_sample(X[i])[0])
        await producer.stop()
        count = Counter()
        worker = TrainingWorker(  # one death would dead-letter the message as poison
            _settings(kafka_bootstrap, unique_topic, redis_url, batch_size=20, max_attempts=1),
            hooks=TrainerHooks(on_step=count),
        )
        assert await _run_until(worker, lambda: count.samples >= n_good) == 0
        return await _dead_letters(kafka_bootstrap, unique_topic, 1), offset

    (letter,), offset = asyncio.run(main())
    headers = dict(letter.headers)
    assert headers["reason"] == b"not_json" and int(headers["source_offset"]) == offset
    # kept whole where the broker takes it; else sent without its value, its size noted
    assert letter.value == big or (letter.value == b""
                                   and headers["value_dropped"] == str(len(big)).encode())
    assert open_store(redis_url, "t").load().manifest["samples_seen"] == n_good


def test_a_dead_letter_too_large_to_send_goes_without_its_value(kafka_bootstrap, unique_topic):
    async def main() -> list[Any]:
        await ensure_topic(kafka_bootstrap, f"{unique_topic}.dlq")
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=4096)
        await producer.start()
        try:
            dlq = DeadLetters(producer, f"{unique_topic}.dlq")
            headers = dead_letter_headers(None, "not_json", "x", unique_topic, 0, 7)
            await dlq.send(b"k", b"y" * 20_000, headers)  # over the producer's request size
            await dlq.send(b"k", b"small", headers)
            huge = dead_letter_headers([("trace", b"z" * 9_000)], "bad_schema", "x",
                                       unique_topic, 0, 8)  # the headers alone are too large
            await dlq.send(b"k", b"v", huge)
            assert await dlq.flush() == 3
        finally:
            await producer.stop()
        return await _dead_letters(kafka_bootstrap, unique_topic, 3)

    big, small, bare = asyncio.run(main())
    assert big.value == b"" and dict(big.headers)["value_dropped"] == b"20000"
    assert dict(big.headers)["reason"] == b"not_json" and big.key == b"k"
    assert small.value == b"small" and "value_dropped" not in dict(small.headers)
    h = dict(bare.headers)  # only the dead-letter headers, and what was dropped
    assert bare.value == b"" and bare.key is None and "trace" not in h
    assert (h["reason"], h["source_offset"], h["value_dropped"], h["key_dropped"]) == (
        b"bad_schema", b"8", b"1", b"1")
    assert int(h["headers_dropped"]) == len("trace") + 9_000


def test_hostile_readings_are_dead_lettered_and_windows_go_on(
    kafka_bootstrap, redis_url, unique_topic
):
    size, n = 8, 64
    rng = np.random.default_rng(0)
    hostile = [
        (_deep(400, "values"), "too_deep"),
        (json.dumps({"device": "a", "values": [1, 2, 3e38]}).encode(), "out_of_range"),
        (json.dumps({"device": "a", "values": [1, 2, 3], "label": 2**63}).encode(),
         "out_of_range"),
        (json.dumps({"device": "a", "values": [1, 2, 2**80]}).encode(), "out_of_range"),
    ]

    async def main() -> TrainingWorker:
        await ensure_topic(kafka_bootstrap, unique_topic)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        for t in range(n):
            value, headers = encode_reading("a", rng.normal(size=3), ts=float(t))
            await producer.send(unique_topic, value, headers=headers)
            if t % 10 == 5 and t // 10 < len(hostile):
                await producer.send(unique_topic, hostile[t // 10][0], key=b"a")
        await producer.stop()
        count = Counter()
        worker = TrainingWorker(
            _settings(kafka_bootstrap, unique_topic, redis_url, mode="readings",
                      window_size=size, window_hop=size, batch_size=4, n_clusters=2),
            hooks=TrainerHooks(on_step=count),
        )
        assert await _run_until(worker, lambda: count.samples >= n // size) == 0
        return worker

    worker = asyncio.run(main())
    reg = worker.metrics.registry
    for reason in ("too_deep", "out_of_range"):
        want = sum(1 for _, r in hostile if r == reason)
        assert reg.get_sample_value("oclust_worker_dlq_messages_total",
                                    {"reason": reason}) == want
    assert reg.get_sample_value("oclust_worker_samples_total") == n // size


def test_a_stray_first_message_on_one_partition_does_not_decide_the_shape(
    kafka_bootstrap, redis_url, unique_topic
):
    # the first fetch: one 3-feature message on one partition, the stream's 64-feature samples
    # on the other; settled partition by partition, the stray one fixed the shape and all the
    # good ones went to the DLQ whenever its partition came first in the fetch
    X, _ = datasets.load("digits")
    n_good = 60
    STRAY = 1

    async def main() -> tuple[int, list[Any]]:
        await ensure_topic(kafka_bootstrap, unique_topic, partitions=2)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        await producer.send_and_wait(unique_topic, encode_sample([1.0, 2.0, 3.0])[0],
                                     partition=STRAY)
        for i in range(n_good):
            value, headers = encode_sample(X[i])
            await producer.send(unique_topic, value, headers=headers, partition=1 - STRAY)
        await producer.stop()
        count = Counter()
        worker = TrainingWorker(_settings(kafka_bootstrap, unique_topic, redis_url,
                                          batch_size=20, snapshot_interval=0),
                                hooks=TrainerHooks(on_step=count))
        assert await _run_until(worker, lambda: count.samples >= n_good, timeout=60) == 0
        return count.samples, await _dead_letters(kafka_bootstrap, unique_topic, 1)

    trained, got = asyncio.run(main())
    assert trained == n_good
    assert len(got) == 1 and dict(got[0].headers)["reason"] == b"wrong_length"
    assert dict(got[0].headers)["source_partition"] == str(STRAY).encode()
