"""A hung training process (``train_timeout``): killed, and the worker fails as when it dies.

The child is hung for real: SIGSTOP freezes it mid-stream, so it neither answers nor exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from oclust.model import datasets
from oclust.training_worker.batching import Batch
from oclust.training_worker.producer import replay
from oclust.training_worker.store import open_store
from oclust.training_worker.trainproc import ProcessTrainer, TrainProcessDied

from .test_trainproc import _rings, _settings, _stop_training_midstream, _trainer, _wait_gone
from .test_worker_process import (
    FIRST,
    N_DIGITS,
    _train_then_sigterm,
)


def test_a_hung_training_process_is_killed_after_the_timeout(tmp_path):
    X, _ = datasets.load("digits")
    batch = Batch(X[:64].astype(np.float32), np.full(64, -1))
    s = _settings(tmp_path)

    async def main() -> tuple[float, list[BaseException]]:
        remote = await ProcessTrainer.start(_trainer(s), s, in_flight=2)
        try:
            await remote.run_step(batch, None)  # a fresh child's first step takes seconds
            remote.proc.settings = s.model_copy(update={"train_timeout": 1.0})
            os.kill(remote.proc.proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            got = await asyncio.wait_for(asyncio.gather(
                remote.run_step(batch, None), remote.run_snapshot({}, None, None),
                return_exceptions=True), 60)
            return time.monotonic() - t0, got
        finally:
            await remote.proc.shutdown()

    waited, got = asyncio.run(main())
    assert waited >= 1.0  # the timeout, not earlier
    assert all(isinstance(e, TrainProcessDied) for e in got), got
    assert all("did not answer within 1 s" in str(e) for e in got)
    assert not _rings(os.getpid())


@pytest.mark.timeout(240)
def test_a_hung_training_process_fails_the_worker_which_resumes_after(
    kafka_bootstrap, redis_url, unique_topic, tmp_path, monkeypatch
):
    monkeypatch.setenv("OCLUST_TRAIN_TIMEOUT", "10")  # a fresh child's first step takes seconds
    store = open_store(redis_url, "p", keep=None)
    log = tmp_path / "worker.log"
    asyncio.run(replay(kafka_bootstrap, unique_topic, "digits", limit=FIRST, progress=False))
    total = FIRST + N_DIGITS

    # run 1: the training process hangs mid-stream: killed after 10 s, the worker exits 1
    child, took, last = _stop_training_midstream(kafka_bootstrap, unique_topic, redis_url, log,
                                                 signal.SIGSTOP, wait=60)
    assert took > 9  # from the last answer, a moment before the stop
    assert "did not answer within 10 s (train_timeout): killed" in log.read_text()
    assert _wait_gone(child, timeout=5)
    assert last < total

    # run 2: restarted, it resumes from the last snapshot and trains each message once
    monkeypatch.delenv("OCLUST_TRAIN_TIMEOUT")
    _train_then_sigterm(kafka_bootstrap, unique_topic, redis_url, log, total - last)
    final = store.load().manifest
    assert final["offsets"] == {f"{unique_topic}:0": total}
    assert final["samples_seen"] == total

