"""Benchmark: ``oclust up`` from a cold start — time to the first served snapshot, and quality.

Targets (issue 5, this 2-core machine): ready (``/readyz`` 200, a snapshot served) within 20 s
of start; the digits quality target of the foundation issue (NMI >= 0.68 with hard KL* <= 0.05)
within 2 minutes of replay.

Starts ``python -m oclust up`` (the real CLI, in-process stream, directory store in a fresh
temporary directory) on a free port, polls ``/readyz``, then every ``--every`` seconds loads
the store's current snapshot and scores it on all of digits: nearest-centroid predictions
against the labels (ACC, NMI, hard KL* against the class distribution), as in
``oclust.model.evaluation``. Prints a markdown table; the process is stopped with SIGINT at the end.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_up.py [--seconds 120]``
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oclust.model import OnlineClusterer, datasets
from oclust.model import metrics as M
from oclust.training_worker.devbroker import free_port
from oclust.training_worker.store import VersionNotFound, open_store


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="replay time after start")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between scorings")
    args = ap.parse_args()

    X, y = datasets.load("digits")
    ref = M.cluster_distribution(y, 10)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "oclust", "up", "--port", str(port), "--quiet"],
            cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            while not _ready(url):
                if proc.poll() is not None or time.monotonic() - start > 120:
                    raise SystemExit("oclust up did not become ready")
                time.sleep(0.05)  # polling: readiness has no notification
            ready_s = time.monotonic() - start
            store = open_store(f"file://{tmp}/.oclust/store", namespace="up-digits")
            rows = []
            next_at = start + args.every
            while True:
                time.sleep(max(0.0, next_at - time.monotonic()))
                t = time.monotonic() - start
                try:
                    snap = store.load()
                except VersionNotFound:
                    continue
                clf = OnlineClusterer.from_snapshot(snap, device="cpu")
                pred = clf.predict(X)
                rows.append((t, snap.version, snap.meta.samples_seen,
                             M.cluster_acc(y, pred), M.nmi(y, pred),
                             M.kl_star(M.cluster_distribution(pred, 10), ref)))
                next_at += args.every
                if t >= args.seconds:
                    break
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)

    print(f"oclust up (digits, defaults): ready after {ready_s:.1f} s (target 20 s); "
          f"exit code after SIGINT {code}\n")
    print("| t (s) | snapshot | samples trained | ACC | NMI | KL* hard |")
    print("|---:|---:|---:|---:|---:|---:|")
    for t, v, n, acc, nmi, kl in rows:
        print(f"| {t:.0f} | {v} | {n:,} | {acc:.3f} | {nmi:.3f} | {kl:.3f} |")
    hit = next((t for t, *_r, nmi, kl in rows if nmi >= 0.68 and kl <= 0.05), None)
    print(f"\nfirst scoring meeting NMI >= 0.68 and KL* <= 0.05: "
          f"{'never' if hit is None else f'{hit:.0f} s'} (target: within 120 s)")


if __name__ == "__main__":
    main()
