"""Benchmark: /healthz latency while hostile 3-4 MB bodies are being rejected (issue 13).

A real uvicorn server (its own process) serves a small MLP snapshot. An attacker process sends
hostile bodies back to back (a million empty strings, ``true`` values, ``NaN`` values, a million
valid numbers ending in a string, and a full 4096-row batch whose last value is a string); this
process polls ``/healthz`` on a keep-alive connection meanwhile. Target: health checks under
50 ms. The idle row is the same poll with no attack, the machine's own floor.

Run: ``.venv/bin/python benchmarks/bench_hostile.py`` (``--json`` for one JSON object).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time

import httpx

N = 1_000_000
BODIES = {
    "1e6 empty strings": json.dumps({"features": [""] * N}).encode(),
    "1e6 true": json.dumps({"features": [True] * N}).encode(),
    "1e6 NaN": b'{"features": [' + b",".join([b"NaN"] * N) + b"]}",
    "1e6 numbers then a string": json.dumps({"features": [1.0] * N + ["x"]}).encode(),
    "4096 x 64 batch, last value a string": json.dumps(
        {"items": [[1.0] * 64] * 4095 + [[1.0] * 63 + ["x"]]}).encode(),
}


def serve(port: int) -> None:
    """``bench_hostile.py serve PORT``: the service on a small MLP model, no store."""
    import numpy as np
    import uvicorn

    from oclust.model import OnlineClusterer
    from oclust.service.app import create_app
    from oclust.service.loader import LoadedModel, ModelHolder
    from oclust.service.settings import ServiceSettings

    clf = OnlineClusterer(n_clusters=10, seed=0, device="cpu")
    clf.partial_fit(np.random.default_rng(0).normal(size=(256, 64)).astype("float32"))
    holder = ModelHolder()
    holder.swap(LoadedModel.from_snapshot(clf.to_snapshot().with_version(1)))
    uvicorn.run(create_app(ServiceSettings(), holder), host="127.0.0.1", port=port,
                log_level="warning")


def attack(port: int, name: str) -> None:
    """``bench_hostile.py attack PORT NAME``: send one hostile body 3 times; print the answers."""
    body = BODIES[name]
    path = "/assign/batch" if body.startswith(b'{"items"') else "/assign"
    answers = []
    with httpx.Client(timeout=120) as client:
        print("go", flush=True)  # the poller measures from here
        for _ in range(3):
            t0 = time.perf_counter()
            r = client.post(f"http://127.0.0.1:{port}{path}", content=body,
                            headers={"content-type": "application/json"})
            answers.append((r.status_code, time.perf_counter() - t0))
    print(json.dumps(answers))


def _poll(url: str, until: subprocess.Popen | None, n: int = 50) -> list[float]:
    """/healthz latencies, until ``until`` exits (or ``n`` of them when it is None)."""
    out = []
    with httpx.Client(base_url=url, timeout=120) as client:
        client.get("/healthz")
        while (until.poll() is None) if until is not None else len(out) < n:
            t0 = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            out.append(time.perf_counter() - t0)
    return out


def _stats(health: list[float]) -> dict[str, float]:
    return {"healthz_checks": len(health),
            "healthz_p50_ms": round(statistics.median(health) * 1e3, 2),
            "healthz_max_ms": round(max(health) * 1e3, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, __file__, "serve", str(port)])
    results: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "server did not start"
            time.sleep(0.1)
        results["idle (no attack)"] = _stats(_poll(url, None))
        for name, body in BODIES.items():
            attacker = subprocess.Popen([sys.executable, __file__, "attack", str(port), name],
                                        stdout=subprocess.PIPE, text=True)
            assert attacker.stdout is not None and attacker.stdout.readline() == "go\n"
            health = _poll(url, attacker)
            answers = json.loads(attacker.communicate()[0])
            results[name] = {
                "body_mb": round(len(body) / 1e6, 2),
                "status": sorted({s for s, _ in answers}),
                "reject_ms_median": round(statistics.median(t for _, t in answers) * 1e3, 1),
                **_stats(health),
            }
    finally:
        server.terminate()
        server.wait(10)
    if args.json:
        print(json.dumps(results))
        return
    print("| body | size | status | answered in (median) | /healthz checks | p50 | max |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r.get('body_mb', '')} MB | {r.get('status', '')} | "
              f"{r.get('reject_ms_median', '')} ms | {r['healthz_checks']} | "
              f"{r['healthz_p50_ms']} ms | {r['healthz_max_ms']} ms |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "attack":
        attack(int(sys.argv[2]), sys.argv[3])
    else:
        main()
