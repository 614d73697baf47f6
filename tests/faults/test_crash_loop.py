"""A message that kills the worker is found and dead-lettered; the next holder goes on.

Each "crash" is an exception escaping ``TrainingWorker.run`` from inside the training step
(what an uncaught error in the step does to ``oclust worker``); every run is a new worker
object sharing only the store and the consumer group, as a standby after a death would.
"""

from __future__ import annotations

import asyncio

import pytest

from oclust.model import StepReport, datasets
from oclust.training_worker.batching import Batch
from oclust.training_worker.codec import encode_sample
from oclust.training_worker.kafka import committed_offsets, ensure_topic
from oclust.training_worker.store import open_store
from oclust.training_worker.trainer import TrainerHooks
from oclust.training_worker.worker import TrainingWorker
from tests.worker.test_worker import Counter, _run_until, _settings

from .test_poison import _dead_letters

N, POISON_AT, POISON_LABEL = 100, 37, 77


class Boom(RuntimeError):
    """The simulated crash."""


def _crash_on_poison(report: StepReport, batch: Batch) -> None:
    if (batch.labels == POISON_LABEL).any():
        raise Boom("simulated crash on the poison message")


def test_a_message_that_keeps_killing_the_worker_is_dead_lettered(
    kafka_bootstrap, redis_url, unique_topic, caplog
):
    X, y = datasets.load("digits")
    max_attempts = 2

    async def produce() -> None:
        from aiokafka import AIOKafkaProducer

        await ensure_topic(kafka_bootstrap, unique_topic)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        for i in range(N):
            label = POISON_LABEL if i == POISON_AT else int(y[i])
            value, headers = encode_sample(X[i], label=label)
            await producer.send(unique_topic, value, headers=headers)
        await producer.stop()

    def worker(count: Counter) -> TrainingWorker:
        def on_step(report: StepReport, batch: Batch) -> None:
            _crash_on_poison(report, batch)
            count(report, batch)

        return TrainingWorker(
            _settings(kafka_bootstrap, unique_topic, redis_url, batch_size=20,
                      batch_timeout=0.2, max_attempts=max_attempts),
            hooks=TrainerHooks(on_step=on_step),
        )

    asyncio.run(produce())
    crashes = 0
    for _ in range(6):  # 2 deaths on the span, then max_attempts on the message alone
        count = Counter()
        w = worker(count)
        try:
            asyncio.run(_run_until(w, lambda c=count: c.samples >= N - 1, timeout=60))
        except Boom:
            crashes += 1
            continue
        break
    else:
        pytest.fail("the worker never got past the poison message")
    assert crashes == 2 + max_attempts
    assert w.metrics.registry.get_sample_value("oclust_worker_poison_messages_total") == 1
    got = asyncio.run(_dead_letters(kafka_bootstrap, unique_topic, 1))
    headers = dict(got[0].headers)
    assert headers["reason"] == b"poison"
    assert int(headers["source_offset"]) == POISON_AT
    snap = open_store(redis_url, "t").load()
    assert snap.manifest["offsets"] == {f"{unique_topic}:0": N}
    # the last run replayed everything else (nothing was snapshotted before) and skipped one
    assert snap.manifest["samples_seen"] == N - 1
    assert asyncio.run(committed_offsets(kafka_bootstrap, "oclust-t", unique_topic))[0] == N
    assert "taking them one at a time" in caplog.text
    assert "goes to the DLQ as poison" in caplog.text


@pytest.mark.parametrize("process", [True, False], ids=["process", "thread"])
def test_a_broken_model_is_no_crash_its_messages_never_become_poison(
    kafka_bootstrap, redis_url, unique_topic, process
):
    """A model blown up by its learning rate stops the worker again and again; the messages in
    hand are not at fault, so no restart counts a death against them (none goes to the DLQ) and
    once the setting is fixed every one of them trains."""
    max_attempts, n = 2, 96

    async def produce() -> None:
        from oclust.training_worker.producer import replay

        await replay(kafka_bootstrap, unique_topic, "digits", limit=n, progress=False)

    asyncio.run(produce())
    for _ in range(2 + max_attempts + 1):  # enough deaths to dead-letter a message if counted
        w = TrainingWorker(_settings(kafka_bootstrap, unique_topic, redis_url, batch_size=32,
                                     batch_timeout=0.2, max_attempts=max_attempts, lr=1e30,
                                     train_process=process, snapshot_interval=0))
        with pytest.raises(Exception, match="weights up to NaN"):
            asyncio.run(asyncio.wait_for(w.run(), 60))
    assert w.metrics.registry.get_sample_value("oclust_worker_poison_messages_total") == 0
    assert open_store(redis_url, "t").versions() == []
    count = Counter()
    fixed = TrainingWorker(_settings(kafka_bootstrap, unique_topic, redis_url, batch_size=32,
                                     batch_timeout=0.2, max_attempts=max_attempts),
                           hooks=TrainerHooks(on_step=count))
    asyncio.run(_run_until(fixed, lambda: count.samples >= n))
    assert fixed.metrics.registry.get_sample_value("oclust_worker_crash_recoveries_total") == 0
    assert open_store(redis_url, "t").load().manifest["samples_seen"] == n  # nothing lost
