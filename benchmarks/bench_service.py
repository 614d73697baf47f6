"""Benchmark: the assignment service over real HTTP, against a bare FastAPI endpoint.

Targets (issue 4, this 2-core machine): single-point ``POST /assign`` p99 ≤ 5 ms at 500
requests/s, throughput ≥ 70% of a bare FastAPI endpoint returning a constant served the same
way, and ``POST /assign/batch`` ≥ 100k points/s for the MLP model.

What runs, all as separate processes on this machine:

* the service: ``python -m oclust serve`` (the real CLI) on a directory store holding an MLP
  snapshot (digits, 64 -> 512 -> 128, K = 10) trained for a few steps;
* the baseline: a FastAPI app whose ``POST /assign`` returns a constant, started by
  ``uvicorn.run`` with the same settings (one process, no access log, same loop and HTTP
  implementation);
* the load generator: an asyncio HTTP/1.1 client with keep-alive connections, in its own
  process. Open-loop mode sends at a fixed rate and measures latency from each request's
  scheduled send time (no coordinated omission); closed-loop mode keeps N requests in flight
  and reports the throughput. Baseline and service throughput runs alternate (3 rounds each,
  median reported) so that both see the same machine load.

Binary batches (issue 12): the same 4096 points sent as raw float32 rows
(``Content-Type: application/octet-stream``) and answered in binary (``Accept:
application/octet-stream``), against the JSON path on the same model; target ≥ 3× the points/s.

Bodies are real digits samples. Prints a markdown table, or with ``--json`` one JSON object
(``json_points_per_s``, ``binary_points_per_s``, ``binary_over_json``, ...).

Run: ``.venv/bin/python benchmarks/bench_service.py`` (``--quick`` for shorter runs,
``--batches-only`` to skip the single-point and baseline runs, with ``--threads N`` for the
server's inference threads).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# --------------------------------------------------------------------------- load generator
async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


def _request(path: str, body: bytes, binary: bool = False) -> bytes:
    kind = "application/octet-stream\r\nAccept: application/octet-stream" if binary else (
        "application/json")
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _closed_loop(port: int, request: bytes, connections: int, duration: float) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal errors
        reader, writer = await _open(port)
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            status = await _roundtrip(reader, writer, request)
            latencies.append(time.perf_counter() - t0)
            errors += status != 200
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    return {"requests": len(latencies), "errors": errors, "seconds": elapsed,
            "rps": len(latencies) / elapsed, **_percentiles(latencies)}


async def _open_loop(port: int, request: bytes, rate: float, duration: float) -> dict:
    latencies: list[float] = []
    errors = 0
    # FIFO, so every pooled connection stays busy: uvicorn closes keep-alive connections
    # idle for 5 s, and a stale one is replaced (once) like any HTTP client would
    idle: collections.deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        collections.deque())
    for _ in range(8):
        idle.append(await _open(port))

    async def one(scheduled: float) -> None:
        nonlocal errors
        conn = idle.popleft() if idle else await _open(port)
        try:
            status = await _roundtrip(*conn, request)
        except (asyncio.IncompleteReadError, ConnectionError):
            conn[1].close()
            conn = await _open(port)
            status = await _roundtrip(*conn, request)
        latencies.append(time.perf_counter() - scheduled)  # includes any wait to be sent
        errors += status != 200
        idle.append(conn)

    tasks = []
    start = time.perf_counter()
    n = int(rate * duration)
    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for _, writer in idle:
        writer.close()
    return {"requests": n, "errors": errors, "seconds": elapsed, "rps": n / elapsed,
            **_percentiles(latencies)}


def _percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {}
    q = statistics.quantiles(latencies, n=1000, method="inclusive")
    return {"p50_ms": q[499] * 1e3, "p99_ms": q[989] * 1e3, "max_ms": max(latencies) * 1e3}


def load_main(args: argparse.Namespace) -> None:
    """``bench_service.py load ...``: run one load test and print its JSON result."""
    request = _request(args.path, Path(args.body).read_bytes(), args.binary)
    if args.rate:
        result = asyncio.run(_open_loop(args.port, request, args.rate, args.duration))
    else:
        result = asyncio.run(_closed_loop(args.port, request, args.connections, args.duration))
    print(json.dumps(result))


# --------------------------------------------------------------------------- servers
def bare_main(args: argparse.Namespace) -> None:
    """``bench_service.py bare --port P``: the baseline app, served like the service."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/assign")
    async def assign() -> dict:
        return {"cluster": 0, "distance": 0.0, "version": 1}

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(
    cmd: list[str], port: int, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` until the block ends, from when ``/readyz`` on ``port`` answers 200."""
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {cmd} did not become ready")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def _load(port: int, path: str, body: Path, binary: bool = False, **opts: float) -> dict:
    cmd = [PY, __file__, "load", "--port", str(port), "--path", path, "--body", str(body)]
    cmd += ["--binary"] if binary else []
    for k, v in opts.items():
        cmd += [f"--{k}", str(v)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"load run {opts} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def _publish_model(store_dir: Path) -> tuple[int, object]:
    """Train the digits MLP for a few steps and publish it; returns (input size, data)."""
    import numpy as np

    from oclust.model import OnlineClusterer
    from oclust.model.datasets import load
    from oclust.training_worker.store import open_store

    X, _ = load("digits")
    clf = OnlineClusterer(n_clusters=10, seed=0, device="cpu")
    rng = np.random.default_rng(0)
    for _ in range(5):
        clf.partial_fit(X[rng.choice(len(X), 256, replace=False)])
    open_store(f"file://{store_dir}", namespace="bench").publish(clf.to_snapshot())
    return X.shape[1], X


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--batches-only", action="store_true",
                        help="only the JSON and binary batch runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--threads", type=int, default=1,
                        help="with --batches-only: the server's inference threads (default 1)")
    args = parser.parse_args()
    seconds = 4.0 if args.quick else 10.0
    tmp = Path(tempfile.mkdtemp(prefix="oclust-bench-"))
    _, X = _publish_model(tmp / "store")
    single = tmp / "single.json"
    single.write_text(json.dumps({"features": X[7].tolist()}))
    batches = {}
    for n in (1024, 4096):
        batches[n] = tmp / f"batch{n}.json"
        items = [X[i % len(X)].tolist() for i in range(n)]
        batches[n].write_text(json.dumps({"items": items}))
    raw4096 = tmp / "batch4096.f32"
    raw4096.write_bytes(X[[i % len(X) for i in range(4096)]].astype("<f4").tobytes())
    figures: dict[str, float] = {}

    rows: list[tuple[str, str]] = []
    port_bare, port_svc = _free_port(), _free_port()
    serve = [PY, "-m", "oclust", "serve", "--store", f"file://{tmp / 'store'}", "--namespace",
             "bench", "--port", str(port_svc), "--log-level", "warning"]
    conns, rounds = 16, 3
    if args.batches_only:
        figures["threads"] = args.threads
        with _server(serve, port_svc, env={"OCLUST_TORCH_THREADS": str(args.threads)}):
            _batch_figures(port_svc, batches[4096], raw4096, seconds, rows, figures)
        _report(args, seconds, rows, figures)
        return
    with _server([PY, __file__, "bare", "--port", str(port_bare)], port_bare), \
            _server(serve, port_svc):
        _load(port_svc, "/assign", single, connections=4, duration=1.0)  # warm-up
        _load(port_bare, "/assign", single, connections=4, duration=1.0)
        bare_runs, svc_runs = [], []
        for _ in range(rounds):  # interleaved, so both see the same machine load
            bare_runs.append(_load(port_bare, "/assign", single, connections=conns,
                                   duration=seconds / rounds))
            svc_runs.append(_load(port_svc, "/assign", single, connections=conns,
                                  duration=seconds / rounds))
        bare = sorted(bare_runs, key=lambda r: r["rps"])[rounds // 2]
        svc = sorted(svc_runs, key=lambda r: r["rps"])[rounds // 2]
        paced = _load(port_svc, "/assign", single, rate=500, duration=seconds)
        for n, body in batches.items():
            res = _load(port_svc, "/assign/batch", body, connections=2, duration=seconds)
            rows.append((f"/assign/batch, {n} points per request, 2 connections, torch 1 thread",
                         f"{res['rps'] * n:,.0f} points/s (p50 {res['p50_ms']:.1f} ms, "
                         f"errors {res['errors']})"))
        _batch_figures(port_svc, batches[4096], raw4096, seconds, rows, figures)
    with _server(serve, port_svc, env={"OCLUST_TORCH_THREADS": "2"}):
        res = _load(port_svc, "/assign/batch", batches[4096], connections=2, duration=seconds)
        rows.append(("/assign/batch, 4096 points per request, 2 connections, torch 2 threads",
                     f"{res['rps'] * 4096:,.0f} points/s (p50 {res['p50_ms']:.1f} ms, "
                     f"errors {res['errors']})"))

    ratio = svc["rps"] / bare["rps"]
    figures.update(single_rps=svc["rps"], bare_rps=bare["rps"], single_over_bare=ratio,
                   paced_p99_ms=paced["p99_ms"])
    head = [
        (f"bare FastAPI constant, closed loop {conns} connections (median of {rounds})",
         f"{bare['rps']:,.0f} req/s (p50 {bare['p50_ms']:.2f} ms, p99 {bare['p99_ms']:.2f} ms)"),
        (f"/assign single point, closed loop {conns} connections (median of {rounds})",
         f"{svc['rps']:,.0f} req/s (p50 {svc['p50_ms']:.2f} ms, p99 {svc['p99_ms']:.2f} ms, "
         f"errors {svc['errors']})"),
        ("/assign throughput / bare throughput", f"{ratio:.0%} (target ≥ 70%)"),
        ("/assign single point at 500 req/s (open loop)",
         f"p50 {paced['p50_ms']:.2f} ms, p99 {paced['p99_ms']:.2f} ms (target ≤ 5 ms), "
         f"max {paced['max_ms']:.1f} ms, achieved {paced['rps']:.0f} req/s, "
         f"errors {paced['errors']}"),
    ]
    _report(args, seconds, head + rows, figures)


def _batch_figures(port: int, json_body: Path, raw_body: Path, seconds: float,
                   rows: list[tuple[str, str]], figures: dict[str, float]) -> None:
    """JSON vs binary /assign/batch, 4096 points per request, alternating 3 rounds each."""
    _load(port, "/assign/batch", raw_body, binary=True, connections=2, duration=1.0)  # warm-up
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(3):
        for binary in (False, True):
            runs[binary].append(_load(port, "/assign/batch", raw_body if binary else json_body,
                                      binary=binary, connections=2, duration=seconds / 3))
    med = {b: sorted(r, key=lambda x: x["rps"])[1] for b, r in runs.items()}
    pts = {b: med[b]["rps"] * 4096 for b in med}
    figures.update(json_points_per_s=pts[False], binary_points_per_s=pts[True],
                   binary_over_json=pts[True] / pts[False],
                   errors=float(med[False]["errors"] + med[True]["errors"]))
    for binary, name in ((False, "JSON"), (True, "binary float32 in and out")):
        rows.append((f"/assign/batch {name}, 4096 points per request, 2 connections "
                     "(median of 3)", f"{pts[binary]:,.0f} points/s (p50 "
                     f"{med[binary]['p50_ms']:.1f} ms, errors {med[binary]['errors']})"))
    rows.append(("binary / JSON points/s", f"{pts[True] / pts[False]:.1f}x (target ≥ 3x)"))


def _report(args: argparse.Namespace, seconds: float, rows: list[tuple[str, str]],
            figures: dict[str, float]) -> None:
    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in figures.items()}))
        return
    print(f"\nservice benchmark ({seconds:.0f} s per run, {os.cpu_count()} CPUs, "
          f"model: digits MLP 64-512-128, K=10)\n")
    print("| measurement | result |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("load", "bare"):
        p = argparse.ArgumentParser()
        p.add_argument("mode")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--path", default="/assign")
        p.add_argument("--body", default="")
        p.add_argument("--rate", type=float, default=0.0)
        p.add_argument("--connections", type=int, default=16)
        p.add_argument("--duration", type=float, default=5.0)
        p.add_argument("--binary", action="store_true")
        a = p.parse_args()
        load_main(a) if a.mode == "load" else bare_main(a)
    else:
        main()
