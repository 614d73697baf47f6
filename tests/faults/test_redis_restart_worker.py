"""The store's redis-server killed (SIGKILL) and restarted from its append-only file while an
``oclust worker`` trains.

A private redis-server (``--appendonly yes --appendfsync always``, its own directory), so
killing it disturbs no other test. The outage is longer than the lease TTL (2 s): the worker
loses the lease, waits for the store as a standby, takes the lease back once Redis is up,
resumes from the last stored snapshot and trains the rest. Prints the measured gap.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from oclust.training_worker.devbroker import free_port
from oclust.training_worker.kafka import committed_offsets
from oclust.training_worker.producer import replay
from oclust.training_worker.store import open_store

from ..conftest import system_binary
from ..worker.test_worker_process import (
    FIRST,
    N_DIGITS,
    _produce_in_background,
    _wait_for_offset,
    _worker,
)
from .test_takeover import _wait_for_new_version

OUTAGE = 3.0  # seconds Redis stays down; the lease TTL is 2 s


class RedisServer:
    """A redis-server on a free port whose data lives in ``directory`` (AOF, fsync always)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [system_binary("redis-server", "redis-server"), "--port", str(self.port),
               "--bind", "127.0.0.1", "--dir", str(self.directory), "--appendonly", "yes",
               "--appendfsync", "always", "--save", ""]
        with open(self.directory / "redis.log", "ab") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:  # until it answers (after replaying its AOF)
            assert self.process.poll() is None, (self.directory / "redis.log").read_text()
            try:
                if client.ping():
                    break
            except redis.RedisError:
                assert time.monotonic() < deadline, "redis-server did not come up"
                time.sleep(0.02)  # nothing to wait on but the socket itself
        client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None


@pytest.mark.timeout(120)
def test_redis_killed_and_restarted_under_the_worker_loses_nothing(
    kafka_bootstrap, unique_topic, tmp_path
):
    topic = unique_topic
    server = RedisServer(tmp_path)
    server.start()
    store = open_store(server.url, "p", keep=None)
    log = tmp_path / "worker.log"
    total = FIRST + N_DIGITS
    proc = producer = None
    try:
        asyncio.run(replay(kafka_bootstrap, topic, "digits", limit=FIRST, progress=False))
        proc = _worker(kafka_bootstrap, topic, server.url, log, -1, snapshot_interval=0.2)
        _wait_for_offset(store, topic, FIRST, proc, log)  # training has begun
        producer = _produce_in_background(kafka_bootstrap, topic, N_DIGITS, rate=500)
        _wait_for_offset(store, topic, FIRST + 300, proc, log)
        assert producer.is_alive(), "the stream ended before the outage: not mid-stream"
        server.kill()
        try:
            time.sleep(OUTAGE)  # the fault itself: no store for OUTAGE s
            assert proc.poll() is None, f"worker died:\n{log.read_text()[-3000:]}"
            # what the group committed while the store was down (no snapshot could be
            # published then): it must be covered by a snapshot stored before the kill
            during = asyncio.run(committed_offsets(kafka_bootstrap, "oclust-p", topic))[0]
        finally:
            server.start()
        restarted = time.monotonic()
        known = store.current_version()
        _wait_for_new_version(store, known, proc, log)
        gap = time.monotonic() - restarted
        producer.join(timeout=60)
        assert not producer.is_alive(), "the producer never finished"
        _wait_for_offset(store, topic, total, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if producer is not None:
            producer.join(timeout=30)
        try:
            snaps = {v: store.load(v).manifest for v in store.versions()}
        finally:
            store.close()
            server.kill()
    text = log.read_text()
    assert "lost the lease" in text or "publishing failed" in text  # the outage was felt
    versions = sorted(snaps)
    assert versions == list(range(1, versions[-1] + 1))  # none lost, none reused
    assert known is not None and known in snaps  # the AOF kept what was published
    assert during in {m["offsets"][f"{topic}:0"] for m in snaps.values()}
    for v, m in snaps.items():  # no published model ever counted a message twice
        assert m["samples_seen"] == m["offsets"][f"{topic}:0"], (v, m)
    final = snaps[versions[-1]]
    assert final["offsets"] == {f"{topic}:0": total} and final["samples_seen"] == total
    assert asyncio.run(committed_offsets(kafka_bootstrap, "oclust-p", topic))[0] == total
    print(f"\nredis down {OUTAGE:.0f} s: restart -> next snapshot {gap:.2f} s")
