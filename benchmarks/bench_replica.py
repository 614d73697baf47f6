"""Benchmark: the memory of one serving replica, and whether it loaded torch.

Target (issue 14): ``oclust serve`` with the digits MLP snapshot (64 -> 512 -> 128, K = 10)
stays under 250 MiB RSS, and torch is absent from the process.

It publishes that snapshot to a directory store, starts the real CLI
(``python -m oclust serve``) on it, waits for ``/readyz``, sends 200 single ``/assign``
requests and 20 batches of 256 to ``/assign/batch``, then reads the server's ``/proc/PID/status``
(``VmRSS`` now, ``VmHWM`` its peak) and ``/proc/PID/maps`` (a mapped ``libtorch`` means torch
was imported). ``--root DIR`` runs the server from another checkout (e.g. the one before the
change) for a before/after row.

Run: ``.venv/bin/python benchmarks/bench_replica.py [--root DIR] [--json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_service import _free_port, _publish_model, _server  # this folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _post(port: int, path: str, body: dict) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
        {"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status


def _proc(pid: int) -> dict[str, float | bool]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    kib = {line.split(":")[0]: int(line.split()[1]) for line in status
           if line.startswith(("VmRSS", "VmHWM"))}
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {
        "rss_mib": round(kib["VmRSS"] / 1024, 1),
        "peak_rss_mib": round(kib["VmHWM"] / 1024, 1),
        "torch_loaded": "libtorch" in maps,
        "sklearn_loaded": "sklearn" in maps,
    }


def measure(root: Path) -> dict[str, object]:
    """Start ``oclust serve`` from ``root`` on a fresh digits MLP snapshot and measure it."""
    tmp = Path(tempfile.mkdtemp(prefix="oclust-replica-"))
    X = _publish_model(tmp / "store")[1].tolist()
    port = _free_port()
    cmd = [PY, "-m", "oclust", "serve", "--store", f"file://{tmp / 'store'}", "--namespace",
           "bench", "--port", str(port), "--log-level", "warning"]
    env = {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    with _server(cmd, port, env, cwd=root) as proc:
        ready_s = time.monotonic() - start
        for i in range(200):
            assert _post(port, "/assign", {"features": X[i]}) == 200
        for i in range(20):
            items = [X[(i * 256 + j) % len(X)] for j in range(256)]
            assert _post(port, "/assign/batch", {"items": items}) == 200
        return {"root": str(root), "ready_s": round(ready_s, 2), **_proc(proc.pid)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout to serve from")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    res = measure(args.root.resolve())
    if args.json:
        print(json.dumps(res))
        return
    print("| replica (digits MLP snapshot) | RSS MiB | peak RSS MiB | torch loaded | ready s |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| `oclust serve` from {res['root']} | {res['rss_mib']} | {res['peak_rss_mib']} | "
          f"{'yes' if res['torch_loaded'] else 'no'} | {res['ready_s']} |")


if __name__ == "__main__":
    main()
