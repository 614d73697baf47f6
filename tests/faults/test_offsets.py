"""Offset regressions (a broker restart recreates the topic) and an emptied store.

The broker here is a private Tansu with in-memory storage: restarting it loses the topic and
the group's committed offsets, exactly the "topic recreated" case.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.worker.test_worker import Counter, _run_until, _settings
from oclust.training_worker.devbroker import TansuBroker, free_port
from oclust.training_worker.kafka import committed_offsets
from oclust.training_worker.producer import replay
from oclust.training_worker.store import open_store
from oclust.training_worker.trainer import TrainerHooks
from oclust.training_worker.worker import TrainingWorker, WorkerHalt

ROOT = Path(__file__).resolve().parents[2]


def _train(bootstrap: str, topic: str, store: str, n: int, **kw: object) -> TrainingWorker:
    count = Counter()
    worker = TrainingWorker(_settings(bootstrap, topic, store, batch_timeout=0.2, **kw),
                            hooks=TrainerHooks(on_step=count))
    assert asyncio.run(_run_until(worker, lambda: count.samples >= n)) == 0
    assert count.samples == n
    return worker


@pytest.mark.timeout(120)
def test_recreated_topic_is_trained_as_a_new_incarnation(redis_url, tmp_path, caplog):
    topic = "recreated"
    broker = TansuBroker(port=free_port(), log_path=tmp_path / "tansu.log").start()
    try:
        asyncio.run(replay(broker.bootstrap_servers, topic, "digits", limit=300, progress=False))
        _train(broker.bootstrap_servers, topic, redis_url, 300)
        store = open_store(redis_url, "t")
        assert store.load().manifest["offsets"] == {f"{topic}:0": 300}

        broker.stop()  # in-memory: the topic and the group's offsets are gone
        broker.start()
        asyncio.run(replay(broker.bootstrap_servers, topic, "digits", limit=200, progress=False))

        # policy "exit": the worker stops and says why
        halting = TrainingWorker(_settings(broker.bootstrap_servers, topic, redis_url,
                                           offset_regression="exit"))
        with pytest.raises(WorkerHalt, match="offset regression"):
            asyncio.run(asyncio.wait_for(halting.run(), 60))

        # default policy "reset": all 200 messages of the new log are trained, none skipped
        worker = _train(broker.bootstrap_servers, topic, redis_url, 200)
    finally:
        broker.stop()
    snap = store.load()
    assert snap.manifest["offsets"] == {f"{topic}:0": 200}
    assert snap.manifest["samples_seen"] == 500
    reg = worker.metrics.registry
    assert reg.get_sample_value("oclust_worker_offset_regressions_total",
                                {"kind": "beyond_end"}) == 1
    # (Tansu reports the end of a log written in one batch as 1; the read-back confirms it)
    assert "offset regression on recreated:0: the snapshot covers up to 300" in caplog.text


@pytest.mark.timeout(120)
def test_empty_store_with_committed_offsets_refuses_a_fresh_start(
    kafka_bootstrap, redis_url, unique_topic
):
    asyncio.run(replay(kafka_bootstrap, unique_topic, "digits", limit=100, progress=False))
    _train(kafka_bootstrap, unique_topic, redis_url, 100)
    assert asyncio.run(committed_offsets(kafka_bootstrap, "oclust-t", unique_topic))[0] == 100
    redis.Redis.from_url(redis_url).flushdb()  # the store comes back empty

    # the store URL (which may hold a password) goes in the environment, never in argv
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OCLUST_STORE": redis_url}
    cmd = [sys.executable, "-m", "oclust", "worker", "--bootstrap-servers", kafka_bootstrap,
           "--topic", unique_topic, "--namespace", "t", "--metrics-port", "-1",
           "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=90)
    assert proc.returncode == 1, proc.stderr.decode()[-2000:]
    err = proc.stderr.decode()
    assert "holds no snapshot" in err and "committed offsets {0: 100}" in err
    assert "--allow-fresh" in err
    store = open_store(redis_url, "t")
    assert store.current_version() is None  # nothing was published

    asyncio.run(replay(kafka_bootstrap, unique_topic, "digits", limit=50, progress=False))
    _train(kafka_bootstrap, unique_topic, redis_url, 50, allow_fresh=True)
    snap = store.load()
    assert snap.version == 1 and snap.manifest["offsets"] == {f"{unique_topic}:0": 150}
    assert snap.manifest["samples_seen"] == 50
