"""A consumer-group rebalance while the snapshot is withheld trains nothing twice.

Real Tansu broker and redis-server. The collapse guard's threshold is set out of reach, so every
snapshot is withheld and no offset is ever committed; a second member joining and leaving the
group then takes the partition from the worker and gives it back, and the consumer starts over
at the log start. The worker's model holds everything it trained before: it must skip it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter as Tally

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from oclust.training_worker.codec import encode_sample
from oclust.training_worker.kafka import ensure_topic
from oclust.training_worker.store import open_store
from oclust.training_worker.trainer import TrainerHooks
from oclust.training_worker.worker import TrainingWorker
from tests.worker.test_worker import _settings


class _Events(logging.Handler):
    """The loop's rebalance log lines, as events (the listeners run in the event loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.revoked = asyncio.Event()
        self.assigned = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("partitions revoked"):
            self.revoked.set()
        elif text.startswith("partitions assigned: [0]"):
            self.assigned.set()


def test_a_rebalance_while_the_snapshot_is_withheld_trains_nothing_twice(
    kafka_bootstrap, redis_url, unique_topic, monkeypatch
):
    from oclust.training_worker.monitor import CollapseGuard

    # the guard never finds the served labels healthy: every snapshot is withheld
    monkeypatch.setattr(CollapseGuard, "healthy", property(lambda _self: False))
    first, more = 300, 100
    rng = np.random.default_rng(0)

    async def main() -> tuple[Tally[int], bool]:
        loop = asyncio.get_running_loop()
        await ensure_topic(kafka_bootstrap, unique_topic)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()

        async def send(lo: int, hi: int) -> None:
            for i in range(lo, hi):  # feature 0 names the message
                await producer.send(unique_topic, encode_sample([float(i), *rng.normal(size=7)])[0])
            await producer.flush()

        trained: Tally[int] = Tally()
        reached = {n: asyncio.Event() for n in (first, first + more)}

        def on_step(_report: object, batch: object) -> None:  # the training thread
            trained.update(int(v) for v in batch.x[:, 0])  # type: ignore[attr-defined]
            for n, event in reached.items():
                if len(trained) >= n:
                    loop.call_soon_threadsafe(event.set)

        s = _settings(kafka_bootstrap, unique_topic, redis_url, n_clusters=4, batch_size=20,
                      batch_timeout=0.2, collapse_patience=10**6, collapse_restore=False)
        worker = TrainingWorker(s, hooks=TrainerHooks(on_step=on_step))
        events = _Events()
        logger = logging.getLogger("oclust.training_worker.loop")
        logger.addHandler(events)
        logger.setLevel(logging.INFO)
        run = asyncio.create_task(worker.run())
        try:
            await send(0, first)
            await asyncio.wait_for(reached[first].wait(), 60)
            events.revoked.clear()
            events.assigned.clear()
            other = AIOKafkaConsumer(unique_topic, bootstrap_servers=kafka_bootstrap,
                                     group_id=s.consumer_group, enable_auto_commit=False)
            await other.start()  # joins the group: the worker's partition is revoked
            await asyncio.wait_for(events.revoked.wait(), 60)
            events.assigned.clear()
            await other.stop()  # leaves: the partition comes back to the worker
            await asyncio.wait_for(events.assigned.wait(), 60)
            await send(first, first + more)
            await asyncio.wait_for(reached[first + more].wait(), 60)
        finally:
            worker.request_stop()
            await asyncio.wait_for(run, 60)
            await producer.stop()
            logger.removeHandler(events)
        published = open_store(redis_url, "t").current_version() is not None
        return trained, published

    trained, published = asyncio.run(main())
    assert not published  # the guard withheld every snapshot, as the test needs
    assert set(trained) == set(range(first + more))
    twice = sorted(i for i, n in trained.items() if n > 1)
    assert not twice, f"{len(twice)} messages trained twice, e.g. {twice[:5]}"
