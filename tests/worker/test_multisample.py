"""Multi-sample float32 messages: codec, producer, and the worker on a real Tansu broker."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from oclust.model import OnlineClusterer, datasets
from oclust.training_worker.batching import SampleQueue
from oclust.training_worker.codec import (
    CONTENT_TYPE_F32,
    DecodeError,
    SampleDecoder,
    decode_matrix,
    encode_matrix,
    encode_sample,
)
from oclust.training_worker.kafka import ensure_topic
from oclust.training_worker.producer import dataset_messages, dataset_size
from oclust.training_worker.store import open_store
from oclust.training_worker.trainer import TrainerHooks
from oclust.training_worker.worker import TrainingWorker
from tests.worker.test_worker import Counter, _run_until, _settings

F32 = ("content-type", CONTENT_TYPE_F32.encode())


def test_matrix_round_trip_is_zero_copy_with_labels() -> None:
    x = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    value, headers = encode_matrix(x, labels=[3, -1, 0, 7])
    assert dict(headers)["rows"] == b"4" and dict(headers)["shape"] == b"2,3"
    got, labels = decode_matrix(value, headers, (2, 3))
    np.testing.assert_array_equal(got, x)
    assert labels.tolist() == [3, -1, 0, 7]
    assert np.shares_memory(got, np.frombuffer(value, np.uint8))  # a view, not a copy
    flat, _ = decode_matrix(value, [F32, ("rows", b"4")], None)  # no shape anywhere: flat rows
    assert flat.shape == (4, 6)


@pytest.mark.parametrize(
    ("headers", "value", "reason"),
    [
        ([F32, ("rows", b"3")], np.zeros(8, "<f4").tobytes(), "wrong_length"),  # 8 != 3 x 2
        ([F32, ("rows", b"2"), ("shape", b"4")], np.zeros(8, "<f4").tobytes(), "wrong_length"),
        ([F32, ("rows", b"x")], np.zeros(4, "<f4").tobytes(), "bad_schema"),
        ([F32, ("rows", b"0")], np.zeros(4, "<f4").tobytes(), "bad_schema"),
        ([F32, ("rows", b"1,2")], np.zeros(4, "<f4").tobytes(), "bad_schema"),
        ([F32, ("rows", b"2"), ("labels", b"1")], np.zeros(4, "<f4").tobytes(), "bad_schema"),
        ([F32, ("rows", b"2"), ("labels", b"1,-5")], np.zeros(4, "<f4").tobytes(), "bad_schema"),
        ([F32, ("rows", b"2"), ("shape", b"0")], np.zeros(4, "<f4").tobytes(), "bad_schema"),
        ([F32, ("rows", b"2")], np.array([1, np.nan, 0, 0], "<f4").tobytes(), "non_finite"),
        ([F32, ("rows", b"2")], np.array([1, 3e38, 0, 0], "<f4").tobytes(), "out_of_range"),
        ([F32, ("rows", b"2"), ("labels", b"1,2147483648")], np.zeros(4, "<f4").tobytes(),
         "out_of_range"),
        ([F32, ("rows", b"2"), ("labels", b"1,99999999999999999999999")],
         np.zeros(4, "<f4").tobytes(), "bad_schema"),
        ([F32, ("rows", b"2")], b"\x00" * 7, "bad_binary"),
        ([F32, ("rows", b"2")], b"", "empty"),
    ],
)
def test_bad_matrices_rejected_with_reason(headers: Any, value: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_matrix(value, headers, (2,))
    assert info.value.reason == reason


def test_batch_mixing_matrices_single_samples_and_rejects() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)
    single, single_h = encode_sample([1.0, 2.0, 3.0], label=4)
    values = [encode_matrix(a)[0], single, b"\x00" * 8, encode_matrix(b, labels=[1, 2])[0],
              b"{}"]
    headers = [encode_matrix(a)[1], single_h, [F32, ("rows", b"3")],
               encode_matrix(b, labels=[1, 2])[1], [F32, ("rows", b"1")]]
    dec = SampleDecoder(shape=(3,))
    batch = dec.decode_batch(values, headers)
    np.testing.assert_array_equal(batch.features, np.concatenate([a, [[1, 2, 3]], b]))
    assert batch.index.tolist() == [0] * 5 + [1] + [3, 3]
    assert batch.labels.tolist() == [-1] * 5 + [4] + [1, 2]
    assert [(i, e.reason) for i, e in batch.rejects] == [(2, "wrong_length"), (4, "bad_binary")]
    # a rows header on JSON content is refused, and a fresh decoder learns the shape
    json_rows = SampleDecoder().decode_batch([b'{"features": [1]}'], [[("rows", b"1")]])
    assert [e.reason for _, e in json_rows.rejects] == ["bad_schema"]
    fresh = SampleDecoder()
    assert fresh.decode_batch([encode_matrix(a)[0]], [encode_matrix(a)[1]]).features.shape == (5, 3)
    assert fresh.shape == (3,)


def test_queue_covers_a_message_offset_only_when_all_its_rows_are_taken() -> None:
    dec = SampleDecoder(shape=(2,))
    x = np.zeros((3, 2), np.float32)
    batch = dec.decode_batch([encode_matrix(x)[0], encode_matrix(x[:2])[0]],
                             [encode_matrix(x)[1], encode_matrix(x[:2])[1]])
    offsets = np.array([10, 11], np.int64)[batch.index]
    q = SampleQueue()
    q.put(batch.features, batch.labels, partition=0, offsets=offsets)
    assert len(q) == 5 and q.pending() == {0: 10}
    q.take(2)
    assert q.pending() == {0: 10}  # one row of message 10 still waits
    q.take(1)
    assert q.pending() == {0: 11}
    q.take(2)
    assert q.pending() == {}


def test_producer_packs_samples_per_message() -> None:
    X, y = datasets.load("digits")
    msgs = list(dataset_messages("digits", samples_per_message=500))
    assert len(msgs) == math.ceil(len(X) / 500)
    assert dataset_size("digits", samples_per_message=500) == len(msgs)  # the bar's total
    x, labels = decode_matrix(msgs[-1].value, msgs[-1].headers, X.shape[1:])
    np.testing.assert_array_equal(x, X[1500:].astype(np.float32))
    assert labels.tolist() == y[1500:].tolist()
    with pytest.raises(ValueError, match="samples_per_message"):
        list(dataset_messages("digits", samples_per_message=0))


def test_worker_trains_multi_sample_messages_like_memory(kafka_bootstrap, redis_url, unique_topic):
    X, _y = datasets.load("digits")
    n = len(X)

    async def main() -> tuple[TrainingWorker, list[Any]]:
        await ensure_topic(kafka_bootstrap, unique_topic)
        msgs = list(dataset_messages("digits", samples_per_message=100))
        assert len(msgs) == math.ceil(n / 100)
        bad = np.zeros((2, 7), "<f4").tobytes()  # 14 values: not 2 rows of 64
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        for i, msg in enumerate(msgs):
            if i == 5:
                await producer.send(unique_topic, bad, headers=[F32, ("rows", b"2")])
            await producer.send(unique_topic, msg.value, headers=msg.headers)
        await producer.flush()
        await producer.stop()
        count = Counter()
        worker = TrainingWorker(_settings(kafka_bootstrap, unique_topic, redis_url),
                                hooks=TrainerHooks(on_step=count))
        assert await _run_until(worker, lambda: count.samples >= n - n % 64) == 0
        dlq = AIOKafkaConsumer(f"{unique_topic}.dlq", bootstrap_servers=kafka_bootstrap,
                               auto_offset_reset="earliest", enable_auto_commit=False)
        await dlq.start()
        got = await dlq.getmany(timeout_ms=5000)
        await dlq.stop()
        return worker, [m for msgs in got.values() for m in msgs]

    worker, dead = asyncio.run(main())
    assert len(dead) == 1 and dict(dead[0].headers)["reason"] == b"wrong_length"
    m = open_store(redis_url, "t").load().manifest
    assert m["samples_seen"] == n
    assert m["steps"] == math.ceil(n / 64)  # batches cut by samples, not by messages
    assert m["offsets"] == {f"{unique_topic}:0": 1 + math.ceil(n / 100)}
    assert m["metrics"]["dead_letters"] == 1
    # the same 64-sample batches trained from memory give exactly the same model
    local = OnlineClusterer(n_clusters=10, latent_dim=16, seed=0, device="cpu")
    for start in range(0, n, 64):
        local.partial_fit(X[start : start + 64])
    assert worker.trainer is not None
    np.testing.assert_array_equal(worker.trainer.model.predict(X), local.predict(X))


def test_produce_command_sends_matrices(kafka_bootstrap, unique_topic):
    from typer.testing import CliRunner

    from oclust.service.cli import app
    from tests.service.test_worker_cli import _consume

    result = CliRunner().invoke(app, ["produce", "--dataset", "digits", "--topic", unique_topic,
                                      "--bootstrap-servers", kafka_bootstrap,
                                      "--samples-per-message", "500"])
    assert result.exit_code == 0, result.output
    assert "sent 4 messages" in result.output
    assert "| 4/4 [" in result.output  # the progress bar counts messages: it ended at 4/1797
    msgs = _consume(kafka_bootstrap, unique_topic, 4)
    X, y = datasets.load("digits")
    batch = SampleDecoder(shape=(64,)).decode_batch([m.value for m in msgs],
                                                    [m.headers for m in msgs])
    assert not batch.rejects
    np.testing.assert_array_equal(batch.features, X.astype(np.float32))
    assert batch.labels.tolist() == y.tolist()
    assert batch.index.tolist() == [0] * 500 + [1] * 500 + [2] * 500 + [3] * 297


def test_a_message_cut_between_batches_is_not_trained_twice_after_a_crash(tmp_path) -> None:
    from oclust.training_worker.settings import WorkerSettings
    from oclust.training_worker.stream import LocalStream

    X = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)

    def settings(**kw: Any) -> WorkerSettings:
        base = dict(topic="t", store=f"file://{tmp_path}", namespace="ns", n_clusters=2,
                    batch_size=4, batch_timeout=3600, snapshot_interval=0, metrics_port=-1,
                    train_process=False, seed=0, device="cpu")
        return WorkerSettings(**(base | kw))

    async def main() -> tuple[Any, list[Any], Any]:
        stream = LocalStream()
        value, headers = encode_matrix(X)
        await stream.producer().send_and_wait("t", value, headers=headers)  # one message, 6 rows
        store = open_store(f"file://{tmp_path}", namespace="ns")
        real, loop, first = store.publish, asyncio.get_running_loop(), []

        def publish(snap: Any, owner: str | None = None) -> int:  # the real store, then a crash
            version = real(snap, owner)
            first.append(snap.meta)
            loop.call_soon_threadsafe(crash.cancel)
            return version

        store.publish = publish  # type: ignore[method-assign]
        crash = asyncio.ensure_future(TrainingWorker(settings(), store=store, stream=stream).run())
        with pytest.raises(asyncio.CancelledError):
            await crash
        batches: list[np.ndarray] = []
        count = Counter()

        def on_step(report: Any, batch: Any) -> None:
            batches.append(batch.x.copy())
            count(report, batch)

        again = TrainingWorker(settings(batch_timeout=0.01), stream=stream,
                               hooks=TrainerHooks(on_step=on_step))
        assert await _run_until(again, lambda: count.samples >= 2) == 0
        return first[0], batches, open_store(f"file://{tmp_path}", namespace="ns").load().meta

    first, batches, last = asyncio.run(main())
    # the first batch took 4 of the message's 6 rows; the snapshot says so beside its offset
    assert (first.samples_seen, first.offsets) == (4, {"t:0": 0})
    assert first.offset_state == {"t:0": {"rows": 4}}
    np.testing.assert_array_equal(np.concatenate(batches), X[4:])  # only the rows it lacked
    assert (last.samples_seen, last.offsets, last.offset_state) == (6, {"t:0": 1}, {})
