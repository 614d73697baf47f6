"""``oclust worker`` as a real process: kill -9 mid-stream, restart, SIGTERM; at-least-once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from oclust.training_worker.devbroker import free_port
from oclust.training_worker.kafka import committed_offsets
from oclust.training_worker.producer import replay
from oclust.training_worker.store import SnapshotStore, open_store

N_DIGITS = 1797
FIRST = 300
ROOT = Path(__file__).resolve().parents[2]


def _worker(bootstrap: str, topic: str, store: str, log: Path, metrics_port: int,
            snapshot_interval: float) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "oclust", "worker", "--bootstrap-servers", bootstrap,
        "--topic", topic, "--store", store, "--namespace", "p", "--n-clusters", "10",
        "--batch-size", "50", "--batch-timeout", "0.3", "--snapshot-interval",
        str(snapshot_interval), "--latent-dim", "16", "--device", "cpu", "--keep", "1000",
        "--metrics-port", str(metrics_port), "--session-timeout-ms", "1000",
        "--lease-ttl", "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)


def _wait_for_offset(store: SnapshotStore, topic: str, at_least: int, proc: subprocess.Popen,
                     log: Path, timeout: float = 60) -> int:
    """Block on the store's notices until a snapshot covers ``at_least`` messages."""
    deadline = time.monotonic() + timeout
    known = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"worker died:\n{log.read_text()[-3000:]}"
        known = store.wait_for_change(known, timeout=1.0)
        if known is not None:
            offset = store.load(known).manifest["offsets"].get(f"{topic}:0", 0)
            if offset >= at_least:
                return offset
    raise AssertionError(f"no snapshot covered {at_least} messages:\n{log.read_text()[-3000:]}")


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def _wait_for_metric(port: int, name: str, value: float, proc: subprocess.Popen, log: Path,
                     timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"worker died:\n{log.read_text()[-3000:]}"
        try:
            if _metric(port, name) >= value:
                return
        except OSError:
            pass  # the metrics server is not up yet
        time.sleep(0.1)  # polling another process's /metrics: no event to wait on
    raise AssertionError(f"{name} never reached {value}:\n{log.read_text()[-3000:]}")


def _produce_in_background(bootstrap: str, topic: str, limit: int, rate: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: asyncio.run(
        replay(bootstrap, topic, "digits", limit=limit, rate=rate, progress=False)))
    thread.start()
    return thread


def _train_then_sigterm(bootstrap: str, topic: str, store: str, log: Path,
                        samples: float) -> subprocess.Popen[bytes]:
    """Run a worker without periodic snapshots until it trained ``samples`` samples, then
    SIGTERM it: it must exit 0, its final snapshot being its only one. The stopped process."""
    port = free_port()
    proc = _worker(bootstrap, topic, store, log, port, snapshot_interval=3600)
    try:
        _wait_for_metric(port, "oclust_worker_samples_total", samples, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc


@pytest.mark.timeout(180)
def test_kill_9_then_restart_trains_everything_and_sigterm_snapshots(
    kafka_bootstrap, redis_url, unique_topic, tmp_path
):
    store = open_store(redis_url, "p", keep=None)
    log = tmp_path / "worker.log"
    asyncio.run(replay(kafka_bootstrap, unique_topic, "digits", limit=FIRST, progress=False))

    # run 1: snapshots every 0.2 s while the stream keeps coming at 1000 messages/s;
    # SIGKILL once a snapshot covers part of the stream
    proc = _worker(kafka_bootstrap, unique_topic, redis_url, log, -1, snapshot_interval=0.2)
    producer = None
    try:
        _wait_for_offset(store, unique_topic, FIRST, proc, log)  # the worker is up
        producer = _produce_in_background(kafka_bootstrap, unique_topic, N_DIGITS, rate=1000)
        _wait_for_offset(store, unique_topic, FIRST + 300, proc, log)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        if producer is not None:
            assert producer.is_alive(), "the stream ended before the kill: not mid-stream"
            producer.join(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    total = FIRST + N_DIGITS

    versions = store.versions()
    snaps = [store.load(v) for v in versions]
    last = snaps[-1].manifest["offsets"][f"{unique_topic}:0"]
    committed = asyncio.run(committed_offsets(kafka_bootstrap, "oclust-p", unique_topic))[0]
    # offsets are committed only up to what a stored snapshot covers
    assert committed is not None and committed <= last
    assert committed in {s.manifest["offsets"][f"{unique_topic}:0"] for s in snaps}
    # every snapshot contains exactly the messages below its offset (no DLQ in this stream)
    for s in snaps:
        assert s.manifest["samples_seen"] == s.manifest["offsets"][f"{unique_topic}:0"]

    assert last < total

    # run 2: no periodic snapshot (interval 1 h): its only snapshot is the one SIGTERM leaves
    _train_then_sigterm(kafka_bootstrap, unique_topic, redis_url, log, total - last)
    final = store.load()
    assert final.version == versions[-1] + 1
    m = final.manifest
    assert m["offsets"] == {f"{unique_topic}:0": total}
    # resumed from the last snapshot: every message trained, none twice into the model
    assert m["samples_seen"] == total
    committed = asyncio.run(committed_offsets(kafka_bootstrap, "oclust-p", unique_topic))[0]
    assert committed == total
    text = log.read_text()
    assert f"resuming from snapshot version {versions[-1]}" in text
    assert "[final]" in text
