"""Corrupted blobs under the worker: a flipped byte in the newest snapshot's weights and in
the manifest of the one before, then the worker restarts on that store.

Promise (``TrainingWorker`` resumes from the newest snapshot that verifies): the worker falls
back to the newest valid version, trains every message that version does not hold (the
consumer group had already committed past it), and publishes the next version number, so
versions never go backwards. The service side (a fresh replica refusing a corrupt pointed
version and serving the newest valid one) is proved by
``tests/faults/test_service_faults.py::test_fresh_replica_falls_back_to_the_newest_valid_version``.
"""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from oclust.model import SnapshotError
from oclust.training_worker.kafka import committed_offsets
from oclust.training_worker.producer import replay
from oclust.training_worker.store import open_store
from oclust.training_worker.trainer import TrainerHooks
from oclust.training_worker.worker import TrainingWorker

from ..worker.test_worker import Counter, _run_until, _settings

STEP = 100  # messages per worker run; each run ends with one (final) snapshot


def _train(bootstrap: str, topic: str, store: str, n: int) -> Counter:
    """Run a worker until it has trained ``n`` samples; its clean stop publishes a snapshot."""
    count = Counter()
    worker = TrainingWorker(_settings(bootstrap, topic, store, batch_timeout=0.2),
                            hooks=TrainerHooks(on_step=count))
    assert asyncio.run(_run_until(worker, lambda: count.samples >= n, timeout=30)) == 0
    return count


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1:]


@pytest.mark.timeout(120)
def test_worker_falls_back_past_corrupt_snapshots_and_retrains_what_they_held(
    kafka_bootstrap, redis_url, unique_topic, caplog
):
    topic, key = unique_topic, f"{unique_topic}:0"
    store = open_store(redis_url, "t", keep=None)
    for _ in range(3):  # versions 1, 2, 3 at offsets 100, 200, 300
        asyncio.run(replay(kafka_bootstrap, topic, "digits", limit=STEP, progress=False))
        assert _train(kafka_bootstrap, topic, redis_url, STEP).samples == STEP
    assert [store.load(v).manifest["offsets"][key] for v in store.versions()] == [100, 200, 300]
    assert asyncio.run(committed_offsets(kafka_bootstrap, "oclust-t", topic))[0] == 300

    client = store.client
    weights = client.get(store.key("weights", 3))
    client.set(store.key("weights", 3), _flip(weights, len(weights) // 2))
    manifest = client.get(store.key("manifest", 2))
    digit = re.search(rb'"samples_seen":\s*(\d)', manifest)
    assert digit is not None
    client.set(store.key("manifest", 2), _flip(manifest, digit.start(1)))  # "200" -> "300"
    for version in (2, 3):
        with pytest.raises(SnapshotError):
            store.load(version)

    asyncio.run(replay(kafka_bootstrap, topic, "digits", limit=STEP, progress=False))
    caplog.set_level(logging.INFO, logger="oclust.training_worker")
    # resumed from version 1 (offset 100): messages 100..399 are trained, none skipped
    count = _train(kafka_bootstrap, topic, redis_url, 300)
    assert count.samples == 300
    assert "current snapshot is unusable" in caplog.text
    assert "resuming from snapshot version 1" in caplog.text
    assert "training 100..299 again" in caplog.text  # the group had committed 300

    final = store.load()
    assert final.version == 4  # the next number: versions never go backwards
    assert final.manifest["offsets"] == {key: 400}
    assert final.manifest["samples_seen"] == 400  # 0 lost, 0 counted twice
    assert asyncio.run(committed_offsets(kafka_bootstrap, "oclust-t", topic))[0] == 400
