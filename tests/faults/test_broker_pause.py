"""The broker frozen (SIGSTOP) for longer than the session timeout while a worker trains.

A private Tansu broker, so freezing it disturbs no other test; one ``oclust worker`` process,
the stream arriving at 500 messages/s. The worker must survive the pause (its group session
expires, the group rebalances) and the final snapshot must hold every message exactly once.
Prints the measured recovery time (pause end -> next published snapshot).
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from oclust.training_worker.devbroker import TansuBroker, free_port
from oclust.training_worker.kafka import committed_offsets
from oclust.training_worker.producer import replay
from oclust.training_worker.store import open_store

from ..worker.test_worker_process import (
    FIRST,
    N_DIGITS,
    _produce_in_background,
    _wait_for_offset,
    _worker,
)
from .test_takeover import _wait_for_new_version

PAUSE = 4.0  # seconds; the workers' session timeout is 1 s


@pytest.mark.timeout(120)
def test_broker_paused_longer_than_the_session_timeout_loses_nothing(redis_url, tmp_path):
    topic = "paused"
    broker = TansuBroker(port=free_port(), log_path=tmp_path / "tansu.log").start()
    assert broker.process is not None
    bootstrap = broker.bootstrap_servers
    store = open_store(redis_url, "p", keep=None)
    log = tmp_path / "worker.log"
    total = FIRST + N_DIGITS
    proc = producer = None
    try:
        asyncio.run(replay(bootstrap, topic, "digits", limit=FIRST, progress=False))
        proc = _worker(bootstrap, topic, redis_url, log, -1, snapshot_interval=0.2)
        _wait_for_offset(store, topic, FIRST, proc, log)  # training has begun
        producer = _produce_in_background(bootstrap, topic, N_DIGITS, rate=500)
        _wait_for_offset(store, topic, FIRST + 300, proc, log)
        assert producer.is_alive(), "the stream ended before the pause: not mid-stream"
        broker.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(PAUSE)  # the fault itself: the broker answers nothing for PAUSE s
            assert proc.poll() is None, f"worker died:\n{log.read_text()[-3000:]}"
        finally:
            broker.process.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        held = store.load().manifest["offsets"].get(f"{topic}:0", 0)
        _wait_for_new_version(store, store.current_version(), proc, log)
        recovery = time.monotonic() - resumed
        _wait_for_offset(store, topic, held + 1, proc, log)  # messages fetched after the pause
        progress = time.monotonic() - resumed
        producer.join(timeout=60)
        assert not producer.is_alive(), "the producer never finished"
        _wait_for_offset(store, topic, total, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
        committed = asyncio.run(committed_offsets(bootstrap, "oclust-p", topic))[0]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if producer is not None:
            producer.join(timeout=30)
        broker.stop()
    final = store.load()
    # 0 lost, 0 duplicates: the model holds each of the `total` messages once, and the
    # group's commit is exactly what the snapshot covers
    assert final.manifest["offsets"] == {f"{topic}:0": total}
    assert final.manifest["samples_seen"] == total
    assert committed == total
    for version in store.versions():  # no published model ever counted a message twice
        m = store.load(version).manifest
        assert m["samples_seen"] == m["offsets"][f"{topic}:0"], (version, m)
    print(f"\nbroker paused {PAUSE:.0f} s: SIGCONT -> next snapshot {recovery:.2f} s, "
          f"-> first snapshot beyond offset {held} {progress:.2f} s")
