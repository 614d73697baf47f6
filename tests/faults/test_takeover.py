"""kill -9 of the active worker mid-stream: the standby takes the lease over, nothing is lost.

Two ``oclust worker`` processes on one namespace (Redis lease, TTL 2 s), the stream still
arriving at 1,000 messages/s. Prints the measured takeover and recovery times.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from pathlib import Path
from subprocess import Popen

import pytest

from tests.worker.test_worker_process import (
    FIRST,
    N_DIGITS,
    _produce_in_background,
    _wait_for_metric,
    _wait_for_offset,
    _worker,
)
from oclust.training_worker.devbroker import free_port
from oclust.training_worker.kafka import committed_offsets
from oclust.training_worker.producer import replay
from oclust.training_worker.store import SnapshotStore, open_store


def _active(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("oclust_worker_active "):
            return float(line.split()[1])
    return None


def _wait_for_new_version(store: SnapshotStore, known: int | None, proc: Popen[bytes],
                          log: Path, timeout: float = 60) -> int:
    """Block on the store's notices until the current version is not ``known``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"worker died:\n{log.read_text()[-3000:]}"
        version = store.wait_for_change(known, timeout=1.0)
        if version is not None and version != known:
            return version
    raise AssertionError(f"no new snapshot:\n{log.read_text()[-3000:]}")


@pytest.mark.timeout(180)
def test_kill_9_of_the_active_worker_the_standby_takes_over_and_loses_nothing(
    kafka_bootstrap, redis_url, unique_topic, tmp_path
):
    store = open_store(redis_url, "p", keep=None)
    asyncio.run(replay(kafka_bootstrap, unique_topic, "digits", limit=FIRST, progress=False))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    ports = [free_port(), free_port()]
    # both start together; whichever takes the lease first is the active one
    procs = [_worker(kafka_bootstrap, unique_topic, redis_url, log, port, 0.2)
             for log, port in zip(logs, ports, strict=True)]
    producer = None
    try:
        _wait_for_offset(store, unique_topic, FIRST, procs[0], logs[0])  # training has begun
        for proc, log, port in zip(procs, logs, ports, strict=True):
            _wait_for_metric(port, "oclust_worker_messages_total", 0, proc, log)  # up
        states = [_active(port) for port in ports]
        assert sorted(states) == [0.0, 1.0], states  # one active, one standby
        first = states.index(1.0)
        a, b = procs[first], procs[1 - first]
        ports = [ports[first], ports[1 - first]]
        logs = [logs[first], logs[1 - first]]
        producer = _produce_in_background(kafka_bootstrap, unique_topic, N_DIGITS, rate=1000)
        _wait_for_offset(store, unique_topic, FIRST + 300, a, logs[0])
        a.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert producer.is_alive(), "the stream ended before the kill: not mid-stream"
        a.wait(timeout=10)
        _wait_for_metric(ports[1], "oclust_worker_active", 1, b, logs[1])
        takeover = time.monotonic() - killed
        _wait_for_new_version(store, store.current_version(), b, logs[1])  # b's first snapshot
        recovery = time.monotonic() - killed
        producer.join(timeout=30)
        total = FIRST + N_DIGITS
        _wait_for_offset(store, unique_topic, total, b, logs[1])
        b.send_signal(signal.SIGTERM)
        assert b.wait(timeout=30) == 0, logs[1].read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if producer is not None:
            producer.join(timeout=30)
    final = store.load()
    # every message trained exactly once into the model the standby published: 0 lost,
    # 0 duplicates (the killed worker's unsnapshotted work was replayed, not double-counted)
    assert final.manifest["offsets"] == {f"{unique_topic}:0": total}
    assert final.manifest["samples_seen"] == total
    assert asyncio.run(committed_offsets(kafka_bootstrap, "oclust-p", unique_topic))[0] == total
    text = logs[1].read_text()
    assert "worker metrics on http://127.0.0.1:" in text  # loopback by default
    # one death is no poison pill: whatever the dead worker had in hand (nothing, when its last
    # snapshot covered it all) is replayed, never isolated or dead-lettered
    assert "one at a time" not in text and "as poison" not in text, text[-3000:]
    print(f"\ntakeover (kill -9 -> standby active) {takeover:.2f} s; "
          f"recovery (kill -9 -> standby's first snapshot) {recovery:.2f} s")
