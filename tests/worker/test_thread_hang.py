"""A hung training thread (``--no-train-process``, ``oclust up``): the worker fails, never hangs.

The hang is real: the training thread blocks in the step hook until the test releases it.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from aiokafka import AIOKafkaProducer

from oclust.model import StepReport, datasets
from oclust.training_worker.batching import Batch
from oclust.training_worker.codec import encode_sample
from oclust.training_worker.kafka import committed_offsets
from oclust.training_worker.producer import replay
from oclust.training_worker.store import open_store
from oclust.training_worker.thread import TrainingHung, TrainingThread
from oclust.training_worker.trainer import TrainerHooks
from oclust.training_worker.worker import TrainingWorker

from .test_worker import N_DIGITS, Counter, _run_until, _settings


def test_calls_that_keep_finishing_never_count_as_hung():
    t = TrainingThread(timeout=0.5)
    futures = [t.submit(time.sleep, 0.2) for _ in range(6)]  # 1.2 s queued, 0.2 s per call
    assert [f.result(timeout=30) for f in futures] == [None] * 6
    assert t.failure is None
    t.shutdown()


def test_a_hung_call_fails_every_waiting_call_and_every_later_one():
    t = TrainingThread(timeout=0.5, initializer=threading.current_thread)
    release, ran = threading.Event(), []
    started = time.monotonic()
    hung = t.submit(release.wait)
    queued = t.submit(ran.append, "queued")
    with pytest.raises(TrainingHung, match=r"within 0.5 s \(train_timeout\)"):
        hung.result(timeout=30)
    assert time.monotonic() - started >= 0.5  # the timeout, not earlier
    assert isinstance(queued.exception(timeout=1), TrainingHung)
    assert isinstance(t.submit(ran.append, "later").exception(timeout=1), TrainingHung)
    assert all(th.daemon for th in threading.enumerate() if th.name.startswith("oclust-train"))
    t.shutdown(wait=True)  # returns: a hung thread is not joined
    release.set()
    assert ran == []  # nothing queued behind the hung call runs after it


@pytest.mark.timeout(240)
def test_a_hung_training_thread_fails_the_worker_which_resumes_after(
    kafka_bootstrap, redis_url, unique_topic
):
    X, _ = datasets.load("digits")
    first = 1024
    store = open_store(redis_url, "t", keep=None)
    count, armed, release = Counter(), threading.Event(), threading.Event()
    hung_at: list[float] = []

    def on_step(report: StepReport, batch: Batch) -> None:
        count(report, batch)
        if armed.is_set():  # a step after the first snapshot hangs for real
            hung_at.append(time.monotonic())
            release.wait()

    async def hang_after_a_snapshot() -> None:
        await replay(kafka_bootstrap, unique_topic, "digits", limit=first, progress=False)
        settings = _settings(kafka_bootstrap, unique_topic, redis_url, train_process=False,
                             train_timeout=10.0, snapshot_interval=0.2)
        task = asyncio.ensure_future(
            TrainingWorker(settings, hooks=TrainerHooks(on_step=on_step)).run())
        assert await asyncio.to_thread(store.wait_for_change, None, 60) is not None
        armed.set()
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        for i in range(first, N_DIGITS):
            await producer.send(unique_topic, encode_sample(X[i])[0])
        await producer.stop()
        with pytest.raises(TrainingHung, match="train_timeout"):
            await asyncio.wait_for(task, 90)
        # the timeout runs from the start of the step, milliseconds before its hook hung
        assert time.monotonic() - hung_at[0] >= 9.5

    try:
        asyncio.run(hang_after_a_snapshot())
    finally:
        release.set()
    seen = store.load().manifest["samples_seen"]
    assert 0 < seen < count.samples  # the batch that hung was never snapshotted
    covered = store.load().manifest["offsets"][f"{unique_topic}:0"]
    committed = asyncio.run(committed_offsets(kafka_bootstrap, "oclust-t", unique_topic))[0]
    assert committed == covered  # nothing committed past the last snapshot

    # restarted, it resumes from that snapshot and trains every other message once
    rest = Counter()
    again = TrainingWorker(_settings(kafka_bootstrap, unique_topic, redis_url,
                                     train_process=False), hooks=TrainerHooks(on_step=rest))
    left = N_DIGITS - seen
    asyncio.run(_run_until(again, lambda: rest.samples >= left - left % 64))
    final = store.load().manifest
    assert final["offsets"] == {f"{unique_topic}:0": N_DIGITS}
    assert final["samples_seen"] == N_DIGITS


def test_a_thread_that_could_not_start_fails_its_calls():
    def broken() -> None:
        raise OSError("no threads for torch")

    t = TrainingThread(timeout=30, initializer=broken)
    with pytest.raises(RuntimeError, match="the training thread ended: OSError"):
        t.submit(sum, [1]).result(timeout=30)
    t.shutdown()
