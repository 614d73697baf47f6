"""The training worker in-process against a real Tansu broker and a real redis-server."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from oclust.model import OnlineClusterer, Snapshot, StepReport, datasets
from oclust.model.snapshot import SAMPLE_HELD, SAMPLE_INPUTS, SAMPLE_PREFIX, unpack_arrays
from oclust.training_worker.batching import Batch
from oclust.training_worker.codec import encode_sample
from oclust.training_worker.kafka import committed_offsets, ensure_topic
from oclust.training_worker.producer import replay
from oclust.training_worker.settings import WorkerSettings
from oclust.training_worker.store import open_store
from oclust.training_worker.trainer import TrainerHooks
from oclust.training_worker.worker import TrainingWorker

N_DIGITS = 1797


def _settings(bootstrap: str, topic: str, store: str, **kw: Any) -> WorkerSettings:
    base: dict[str, Any] = dict(
        bootstrap_servers=bootstrap, topic=topic, store=store, namespace="t", n_clusters=10,
        latent_dim=16, batch_size=64, batch_timeout=60, snapshot_interval=3600,
        metrics_port=-1, session_timeout_ms=1000, lease_ttl=5, seed=0, device="cpu", keep=100,
    )
    return WorkerSettings(**(base | kw))


async def _run_until(
    worker: TrainingWorker, done: Callable[[], bool], timeout: float = 60
) -> int:
    """Run ``worker`` and stop it once ``done()`` holds after a step (checked in the hook)."""
    loop = asyncio.get_running_loop()
    previous = worker.hooks.on_step

    def on_step(report: StepReport, batch: Batch) -> None:
        if previous is not None:
            previous(report, batch)
        if done():
            loop.call_soon_threadsafe(worker.request_stop)

    worker.hooks.on_step = on_step
    return await asyncio.wait_for(worker.run(), timeout)


class Counter:
    """Samples trained, counted in the training thread."""

    def __init__(self) -> None:
        self.samples = 0
        self.batches: list[Batch] = []

    def __call__(self, report: StepReport, batch: Batch) -> None:
        self.samples += report.n
        self.batches.append(batch)


async def _train_digits(bootstrap: str, topic: str, store: str, **kw: Any) -> TrainingWorker:
    """Replay the digits into ``topic`` and run a worker (settings ``kw``) until it trained them
    all: all but the last partial batch (5 samples) by size, the rest on stop (final snapshot)."""
    await replay(bootstrap, topic, "digits", progress=False)
    count = Counter()
    worker = TrainingWorker(_settings(bootstrap, topic, store, **kw),
                            hooks=TrainerHooks(on_step=count))
    assert await _run_until(worker, lambda: count.samples >= N_DIGITS - N_DIGITS % 64) == 0
    return worker


def test_digits_stream_to_redis_snapshot(kafka_bootstrap, redis_url, unique_topic):
    X, _y = datasets.load("digits")

    worker = asyncio.run(_train_digits(kafka_bootstrap, unique_topic, redis_url))
    snap = open_store(redis_url, "t").load()
    m = snap.manifest
    assert m["version"] == 1
    assert m["samples_seen"] == N_DIGITS
    assert m["steps"] == math.ceil(N_DIGITS / 64)
    assert m["offsets"] == {f"{unique_topic}:0": N_DIGITS}
    assert m["metrics"]["messages"] == N_DIGITS and m["metrics"]["dead_letters"] == 0
    assert 0 < m["metrics"]["acc"] <= 1 and 0 < m["metrics"]["nmi"] <= 1
    committed = asyncio.run(committed_offsets(kafka_bootstrap, "oclust-t", unique_topic))
    assert committed == {0: N_DIGITS}

    # the same batches in the same order, trained in-process, predict exactly the same
    local = OnlineClusterer(n_clusters=10, latent_dim=16, seed=0, device="cpu")
    for start in range(0, N_DIGITS, 64):
        local.partial_fit(X[start : start + 64])
    served = OnlineClusterer.from_snapshot(snap, device="cpu")
    np.testing.assert_array_equal(served.predict(X), local.predict(X))
    assert worker.trainer is not None
    np.testing.assert_array_equal(worker.trainer.model.predict(X), local.predict(X))
    reg = worker.metrics.registry
    assert reg.get_sample_value("oclust_worker_samples_total") == N_DIGITS
    assert reg.get_sample_value("oclust_worker_batches_total") == m["steps"]
    assert reg.get_sample_value("oclust_worker_consumer_lag", {"partition": "0"}) == 0
    assert reg.get_sample_value("oclust_worker_snapshots_published_total") == 1
    assert reg.get_sample_value("oclust_worker_snapshot_version") == 1
    # the snapshot judge's sample of older digits is stored with it, for a resumed worker
    stored = unpack_arrays(snap.weights)
    assert stored[SAMPLE_INPUTS].shape == (1024, 64) and stored[SAMPLE_HELD].tolist() == [1024]


def test_a_worker_can_keep_the_inputs_out_of_the_store(kafka_bootstrap, redis_url, unique_topic):
    asyncio.run(_train_digits(kafka_bootstrap, unique_topic, redis_url, store_sample=False))
    snap = open_store(redis_url, "t").load()
    assert snap.manifest["samples_seen"] == N_DIGITS
    assert not [name for name in unpack_arrays(snap.weights) if name.startswith(SAMPLE_PREFIX)]


async def _send_burst(bootstrap: str, topic: str, n: int) -> None:
    """Send ``n`` digits 10^4 times the usual (a sensor fault inside the feature bound)."""
    X, y = datasets.load("digits")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in range(n):
            value, headers = encode_sample(X[i % len(X)] * 1e4, label=int(y[i % len(X)]))
            await producer.send(topic, value, headers=headers)
        await producer.flush()
    finally:
        await producer.stop()


def test_a_burst_of_outliers_is_not_published(kafka_bootstrap, redis_url, unique_topic, caplog):
    """Digits, then 640 of them 10^4 times the usual (inside the feature bound): the model that
    learned them serves the burst well spread, so the guard's window passes it, and the usual
    digits to one cluster. The worker judges each snapshot on a sample of older inputs first,
    and keeps the one from before the burst in the store."""
    from oclust.model import metrics as model_metrics

    X, _y = datasets.load("digits")
    n_burst = 640
    total = N_DIGITS + n_burst

    async def main() -> TrainingWorker:
        await replay(kafka_bootstrap, unique_topic, "digits", progress=False)
        await _send_burst(kafka_bootstrap, unique_topic, n_burst)
        count = Counter()
        worker = TrainingWorker(
            _settings(kafka_bootstrap, unique_topic, redis_url, snapshot_interval=0),
            hooks=TrainerHooks(on_step=count))
        assert await _run_until(worker, lambda: count.samples >= total - total % 64) == 0
        return worker

    with caplog.at_level(logging.WARNING, logger="oclust"):
        worker = asyncio.run(main())
    snap = open_store(redis_url, "t").load()
    labels = OnlineClusterer.from_snapshot(snap, device="cpu").predict(X)
    assert model_metrics.entropy(np.bincount(labels, minlength=10) / N_DIGITS) > 2.0
    assert snap.manifest["samples_seen"] < total  # the last one before the burst took over
    assert worker.trainer is not None
    final = worker.trainer.model.predict(X)  # what the worker holds: the burst's model
    assert model_metrics.entropy(np.bincount(final, minlength=10) / N_DIGITS) < 0.5
    reg = worker.metrics.registry
    assert reg.get_sample_value("oclust_worker_reservoir_hard_entropy_nats") < 0.5
    assert reg.get_sample_value("oclust_worker_collapsed") == 1
    assert any("learned a burst" in r.getMessage() for r in caplog.records)


def test_a_worker_resumed_into_a_burst_judges_on_the_sample_stored_with_its_snapshot(
    kafka_bootstrap, redis_url, unique_topic, caplog
):
    """A worker trains on digits and stops; the next one resumes from its snapshot into a
    burst of digits 10^4 times the usual (a restart during a burst, or a burst on a stream
    whose worker was down). It judges on the older digits stored with that snapshot, and
    publishes nothing the burst taught it. Before, its sample of older inputs started empty,
    filled with the burst alone, and the burst's model was published."""
    from oclust.model import metrics as model_metrics

    X, _y = datasets.load("digits")
    n_burst = 1920

    async def burst() -> TrainingWorker:
        await _send_burst(kafka_bootstrap, unique_topic, n_burst)
        count = Counter()
        worker = TrainingWorker(
            _settings(kafka_bootstrap, unique_topic, redis_url, snapshot_interval=0),
            hooks=TrainerHooks(on_step=count))
        assert await _run_until(worker, lambda: count.samples >= n_burst) == 0
        return worker

    def served_entropy(model: OnlineClusterer) -> float:
        labels = model.predict(X)
        return model_metrics.entropy(np.bincount(labels, minlength=10) / N_DIGITS)

    asyncio.run(_train_digits(kafka_bootstrap, unique_topic, redis_url))
    before = open_store(redis_url, "t").load()
    assert before.manifest["samples_seen"] == N_DIGITS
    with caplog.at_level(logging.INFO, logger="oclust"):
        worker = asyncio.run(burst())
    assert any("stored with the snapshot resumed from" in r.getMessage()
               for r in caplog.records)
    assert worker.trainer is not None
    assert served_entropy(worker.trainer.model) < 0.5  # it learned the burst ...
    kept = open_store(redis_url, "t").load()  # ... and published none of it
    assert kept.manifest["version"] == before.manifest["version"]
    assert served_entropy(OnlineClusterer.from_snapshot(kept, device="cpu")) > 2.0
    assert worker.metrics.registry.get_sample_value("oclust_worker_collapsed") == 1


POISON: list[tuple[bytes, list[tuple[str, bytes]], str]] = [
    (b'{"features": [1, NaN, 3]}', [], "non_finite"),
    (b'{"features": [1, 2, 3]}', [], "wrong_length"),
    (b"\x00\x01 not json", [], "not_json"),
    (json.dumps({"features": ["a"] * 64}).encode(), [], "not_numbers"),
    (json.dumps({"features": [0.5] * 64, "pad": "x" * 5000}).encode(), [], "too_large"),
    (b"\x00\x00\x80", [("content-type", b"application/x-oclust-f32")], "bad_binary"),
    (b'{"id": "no features"}', [], "bad_schema"),
]


def test_poison_messages_go_to_dlq_while_training_continues(
    kafka_bootstrap, redis_url, unique_topic
):
    X, y = datasets.load("digits")
    n_good = 320

    async def main() -> tuple[TrainingWorker, list[Any]]:
        await ensure_topic(kafka_bootstrap, unique_topic)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        expected = []
        for i in range(n_good):
            value, headers = encode_sample(X[i], label=int(y[i]), binary=i % 2 == 1)
            await producer.send(unique_topic, value, headers=headers)
            if i % 40 == 7:  # a poison message every 40 good ones
                bad, bad_headers, reason = POISON[(i // 40) % len(POISON)]
                md = await producer.send_and_wait(unique_topic, bad, key=b"k%d" % i,
                                                  headers=bad_headers)
                expected.append((md.offset, bad, reason))
        await producer.flush()
        await producer.stop()
        count = Counter()
        worker = TrainingWorker(
            _settings(kafka_bootstrap, unique_topic, redis_url, batch_size=40,
                      max_message_bytes=4096, snapshot_interval=0),
            hooks=TrainerHooks(on_step=count),
        )
        assert await _run_until(worker, lambda: count.samples >= n_good) == 0
        dlq = AIOKafkaConsumer(f"{unique_topic}.dlq", bootstrap_servers=kafka_bootstrap,
                               auto_offset_reset="earliest", enable_auto_commit=False)
        await dlq.start()
        got: list[Any] = []
        while len(got) < len(expected):
            batch = await dlq.getmany(timeout_ms=5000)
            assert batch, f"dead letters missing: got {len(got)} of {len(expected)}"
            got += [m for msgs in batch.values() for m in msgs]
        await dlq.stop()
        return worker, [(expected, got)]

    worker, [(expected, got)] = asyncio.run(main())
    assert len(got) == len(expected) == 8
    by_offset = {int(dict(m.headers)["source_offset"]): m for m in got}
    for offset, raw, reason in expected:
        msg = by_offset[offset]
        headers = dict(msg.headers)
        assert msg.value == raw  # original bytes
        assert headers["reason"].decode() == reason
        assert headers["reason_detail"]
        assert headers["source_topic"].decode() == unique_topic
    total = n_good + len(expected)
    snap = open_store(redis_url, "t").load()
    assert snap.manifest["samples_seen"] == n_good
    assert snap.manifest["offsets"] == {f"{unique_topic}:0": total}
    assert snap.manifest["metrics"]["dead_letters"] == len(expected)
    reg = worker.metrics.registry
    for _, _, reason in expected:
        n = sum(1 for e in expected if e[2] == reason)
        assert reg.get_sample_value("oclust_worker_dlq_messages_total", {"reason": reason}) == n
    assert reg.get_sample_value("oclust_worker_samples_total") == n_good


@pytest.mark.parametrize("interval", [0, 2])
def test_a_short_final_batch_never_withholds_the_snapshot(
    kafka_bootstrap, redis_url, unique_topic, caplog, interval
):
    """Digits in batches of 256 (7 full, then 5 samples), a snapshot after every batch (0) or
    every 2 seconds, as in the issue that found the final one withheld."""
    count = Counter()
    caplog.set_level(logging.WARNING, logger="oclust.worker")

    async def main() -> TrainingWorker:
        await replay(kafka_bootstrap, unique_topic, "digits", progress=False)
        worker = TrainingWorker(
            _settings(kafka_bootstrap, unique_topic, redis_url, batch_size=256,
                      snapshot_interval=interval),
            hooks=TrainerHooks(on_step=count),
        )
        assert await _run_until(worker, lambda: count.samples >= N_DIGITS - N_DIGITS % 256) == 0
        return worker

    worker = asyncio.run(main())
    assert [len(b) for b in count.batches] == [256] * 7 + [N_DIGITS % 256]
    store = open_store(redis_url, "t")
    snap = store.load()
    assert snap.manifest["samples_seen"] == N_DIGITS
    assert snap.manifest["offsets"] == {f"{unique_topic}:0": N_DIGITS}
    assert snap.manifest["steps"] == len(count.batches)  # the final one covers the short batch
    assert not [r for r in caplog.records if "withheld" in r.getMessage()]
    published = worker.metrics.registry.get_sample_value("oclust_worker_snapshots_published_total")
    assert published == snap.version >= (2 if interval == 0 else 1)
    assert snap.manifest["metrics"]["hard_entropy"] >= 0.5 * math.log(10)
    committed = asyncio.run(committed_offsets(kafka_bootstrap, "oclust-t", unique_topic))
    assert committed == {0: N_DIGITS}
    assert worker.metrics.registry.get_sample_value("oclust_worker_collapsed") == 0


@pytest.mark.parametrize(("lr", "why"), [
    (1e30, "weights up to NaN, infinity or beyond float32"),  # the step's own check
    # finite weights whose distances overflow: the snapshot's probe, or the refusal streak when
    # the steps ran ahead of the checkpoint
    (1e10, "NaN or infinite distances on its latest training batch|refused 20 batches in a row"),
])
@pytest.mark.parametrize("process", [True, False], ids=["process", "thread"])
def test_a_model_blown_up_by_its_learning_rate_stops_the_worker_without_publishing(
    kafka_bootstrap, redis_url, unique_topic, lr, why, process
):
    """A finite, valid, far too large lr blows the weights up on the first step: the worker
    must stop, and neither publish that model nor commit the offsets of the stream it could not
    train on (they are replayed once the setting is fixed). At 1e30 the weights overflow; at
    1e10 they stay finite but every distance does not, which a snapshot checks first."""
    async def main() -> None:
        await replay(kafka_bootstrap, unique_topic, "digits", progress=False)
        worker = TrainingWorker(_settings(kafka_bootstrap, unique_topic, redis_url, lr=lr,
                                          snapshot_interval=0, train_process=process))
        with pytest.raises(Exception, match=why):
            await asyncio.wait_for(worker.run(), 60)

    asyncio.run(main())
    assert open_store(redis_url, "t").versions() == []
    committed = asyncio.run(committed_offsets(kafka_bootstrap, "oclust-t", unique_topic))
    assert not committed.get(0)


def test_collapse_guard_fires_and_restores_healthy_weights(
    kafka_bootstrap, redis_url, unique_topic
):
    X, _y = datasets.load("digits")
    events: list[tuple[Snapshot | None, bool, int | None]] = []
    workers: list[TrainingWorker] = []

    def on_collapse(model: OnlineClusterer, restored: Snapshot | None) -> None:
        same = restored is not None and np.array_equal(
            model.predict(X[:300]),
            OnlineClusterer.from_snapshot(restored, device="cpu").predict(X[:300]),
        )
        events.append((restored, same, workers[0].last_version))

    async def main() -> None:
        await replay(kafka_bootstrap, unique_topic, "digits", loop=True, limit=3 * N_DIGITS,
                     progress=False)
        workers.append(TrainingWorker(
            _settings(kafka_bootstrap, unique_topic, redis_url, regulariser="none",
                      snapshot_interval=0, collapse_patience=3,
                      lr=3e-4),  # slow enough a collapse that healthy snapshots come first
            hooks=TrainerHooks(on_collapse=on_collapse),
        ))
        await _run_until(workers[0], lambda: bool(events))

    asyncio.run(main())
    assert events, "the guard never fired on the collapsing 'none' stream"
    restored, same, last_published = events[0]
    assert restored is not None and same, "the model was not put back to the healthy snapshot"
    assert restored.version == last_published, "restored something else than the last publish"
    store = open_store(redis_url, "t")
    threshold = 0.5 * math.log(10)
    published = [store.load(v) for v in store.versions()]
    assert len(published) >= 2
    # nothing collapsed was ever published: every manifest's last batch was above threshold
    assert all(s.manifest["metrics"]["hard_entropy"] >= threshold for s in published)
    assert restored.manifest["metrics"]["hard_entropy"] >= threshold
    reg = workers[0].metrics.registry
    assert reg.get_sample_value("oclust_worker_collapse_events_total") >= 1


def test_readings_become_per_device_windows_end_to_end(kafka_bootstrap, redis_url, unique_topic):
    readings, _labels = datasets.load_daphnet()
    size, hop, devices, per_device = 32, 16, 2, 400
    length = len(readings) // devices
    streams = [readings[d * length : d * length + per_device] for d in range(devices)]
    expected = {
        np.ascontiguousarray(w).tobytes(): (d, i)
        for d, s in enumerate(streams)
        for i, w in enumerate(np.lib.stride_tricks.sliding_window_view(s, size, axis=0)[::hop])
    }
    n_windows = len(expected)
    count = Counter()

    async def main() -> TrainingWorker:
        await replay(kafka_bootstrap, unique_topic, "daphnet", devices=devices,
                     limit=devices * per_device, progress=False)
        worker = TrainingWorker(
            _settings(kafka_bootstrap, unique_topic, redis_url, mode="readings",
                      window_size=size, window_hop=hop, batch_size=8, n_clusters=2),
            hooks=TrainerHooks(on_step=count),
        )
        await _run_until(worker, lambda: count.samples >= n_windows)
        return worker

    asyncio.run(main())
    seen: dict[int, list[int]] = {d: [] for d in range(devices)}
    for batch in count.batches:
        assert batch.x.shape[1:] == (9, size)
        for w in batch.x:
            d, i = expected[np.ascontiguousarray(w).tobytes()]
            seen[d].append(i)
    n_per_device = n_windows // devices
    assert all(seen[d] == list(range(n_per_device)) for d in seen), "windows out of order"
    # the snapshot covers readings up to the first one still waiting for its window
    first_waiting_t = n_per_device * hop  # each device's buffer starts here
    snap = open_store(redis_url, "t").load()
    assert snap.manifest["offsets"] == {f"{unique_topic}:0": devices * first_waiting_t}
    assert snap.manifest["input_shape"] == [9, size]
    assert snap.manifest["samples_seen"] == n_windows


def test_k2_daphnet_windows_publish_every_snapshot(
    kafka_bootstrap, redis_url, unique_topic, caplog
):
    """K = 2 on readings windows, small batches and a snapshot after each: none withheld."""
    size, hop, devices, per_device = 32, 16, 2, 400
    n_windows = devices * ((per_device - size) // hop + 1)
    count = Counter()
    caplog.set_level(logging.WARNING, logger="oclust.worker")

    async def main() -> TrainingWorker:
        await replay(kafka_bootstrap, unique_topic, "daphnet", devices=devices,
                     limit=devices * per_device, progress=False)
        worker = TrainingWorker(
            _settings(kafka_bootstrap, unique_topic, redis_url, mode="readings",
                      window_size=size, window_hop=hop, batch_size=8, n_clusters=2,
                      snapshot_interval=0),
            hooks=TrainerHooks(on_step=count),
        )
        await _run_until(worker, lambda: count.samples >= n_windows)
        return worker

    worker = asyncio.run(main())
    snap = open_store(redis_url, "t").load()
    assert snap.manifest["samples_seen"] == count.samples == n_windows
    assert snap.manifest["steps"] == len(count.batches)
    assert not [r for r in caplog.records if "withheld" in r.getMessage()]
    reg = worker.metrics.registry
    assert reg.get_sample_value("oclust_worker_snapshots_published_total") == snap.version
    assert reg.get_sample_value("oclust_worker_collapse_events_total") == 0
    assert reg.get_sample_value("oclust_worker_served_hard_entropy_nats") >= 0.5 * math.log(2)


def test_second_worker_is_a_standby_until_the_lease_is_free(
    kafka_bootstrap, redis_url, unique_topic
):
    async def main() -> tuple[TrainingWorker, TrainingWorker, list[int]]:
        await replay(kafka_bootstrap, unique_topic, "digits", limit=640, progress=False)
        first_count, second_count = Counter(), Counter()
        first = TrainingWorker(_settings(kafka_bootstrap, unique_topic, redis_url, lease_ttl=1),
                               hooks=TrainerHooks(on_step=first_count))
        second = TrainingWorker(_settings(kafka_bootstrap, unique_topic, redis_url, lease_ttl=1),
                                hooks=TrainerHooks(on_step=second_count))
        second_started = threading.Event()
        versions: list[int] = []

        async def run_second() -> int:
            await asyncio.to_thread(second_started.wait)
            return await _run_until(second, lambda: second_count.samples >= 320, timeout=25)

        task = asyncio.create_task(run_second())

        def first_done() -> bool:
            if first_count.samples >= 640:
                second_started.set()  # the standby starts while the first still holds the lease
                return True
            return False

        await _run_until(first, first_done)
        versions.append(open_store(redis_url, "t").current_version() or 0)
        # after the first stopped, the standby takes over from its snapshot; feed it more
        await replay(kafka_bootstrap, unique_topic, "digits", limit=320, progress=False)
        await asyncio.wait_for(task, 60)
        return first, second, versions

    _first, second, versions = asyncio.run(main())
    assert versions == [1]
    assert second.trainer is not None
    snap = open_store(redis_url, "t").load()
    assert snap.version == 2
    assert snap.manifest["samples_seen"] == 960  # resumed from version 1's 640 samples
    assert snap.manifest["offsets"] == {f"{unique_topic}:0": 960}


def test_restart_skips_what_the_snapshot_covers_beyond_the_commit(
    kafka_bootstrap, unique_topic, tmp_path
):
    """A crash between publishing a snapshot and committing its offsets: the next worker starts
    at the (older) committed offset and must not train the snapshot's messages twice."""
    store = f"file://{tmp_path}"

    async def main() -> None:
        await replay(kafka_bootstrap, unique_topic, "digits", limit=640, progress=False)
        count = Counter()
        first = TrainingWorker(_settings(kafka_bootstrap, unique_topic, store),
                               hooks=TrainerHooks(on_step=count))
        await _run_until(first, lambda: count.samples >= 640)
        rewind = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id="oclust-t",
                                  enable_auto_commit=False)
        await rewind.start()
        tp = TopicPartition(unique_topic, 0)
        rewind.assign([tp])
        await rewind.commit({tp: 320})  # as if the worker died before committing 640
        await rewind.stop()
        assert (await committed_offsets(kafka_bootstrap, "oclust-t", unique_topic)) == {0: 320}
        await replay(kafka_bootstrap, unique_topic, "digits", limit=320, progress=False)
        count2 = Counter()
        second = TrainingWorker(_settings(kafka_bootstrap, unique_topic, store),
                                hooks=TrainerHooks(on_step=count2))
        await _run_until(second, lambda: count2.samples >= 320)
        assert count2.samples == 320

    asyncio.run(main())
    snap = open_store(store, "t").load()
    assert snap.manifest["samples_seen"] == 960
    assert snap.manifest["offsets"] == {f"{unique_topic}:0": 960}


@pytest.mark.parametrize("kind", ["redis", "file"])
def test_worker_settings_from_environment(monkeypatch, kind, tmp_path):
    monkeypatch.setenv("OCLUST_TOPIC", "from-env")
    monkeypatch.setenv("OCLUST_BATCH_SIZE", "32")
    monkeypatch.setenv("OCLUST_STORE", "redis://h:1/0" if kind == "redis" else "file:///x")
    s = WorkerSettings(batch_size=16)  # the CLI passes given options like this: they win
    assert (s.topic, s.batch_size) == ("from-env", 16)
    assert s.store.startswith(kind)


@pytest.mark.parametrize("name", [
    "OCLUST_SIGMA", "OCLUST_LR", "OCLUST_COLLAPSE_THRESHOLD", "OCLUST_PRIOR_MAX_KL",
    "OCLUST_LEASE_TTL", "OCLUST_TRAIN_TIMEOUT", "OCLUST_MAX_ABS_FEATURE",
])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_settings_refuse_infinite_and_nan_numbers(monkeypatch, name, value):
    # OCLUST_SIGMA=inf used to pass, and the worker then refused every batch and committed them
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="finite number"):
        WorkerSettings()


def test_settings_where_infinity_means_never_keep_it():
    s = WorkerSettings(snapshot_interval=math.inf)
    assert s.snapshot_interval == math.inf


def test_the_feature_bound_is_at_most_the_largest_float32():
    # a bound beyond float32 let values through that the cast turns into inf
    with pytest.raises(ValueError, match="less than or equal"):
        WorkerSettings(max_abs_feature=1e39)
    assert WorkerSettings(max_abs_feature=float(np.finfo(np.float32).max)).max_abs_feature > 3e38
