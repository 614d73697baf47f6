"""Benchmark: the CUDA path of the trainer, the worker and the service, on one GPU.

Measures, on the first CUDA device, in one run:

1. **training from memory** — ``partial_fit`` samples/s of the default model on digits batches of
   256 and 1024 (and on FashionMNIST images with the default convnet when the Debian package is
   installed), after warm-up steps, with ``torch.cuda.synchronize`` around the timing;
2. **CA's share of the step** — the time of the greedy combination assignment (the N×K distance
   matrix copied to the host once, then the compiled loop) against the whole CUDA training step,
   at N×K = 256×10 and 1024×100;
3. **training from Kafka** — the real worker (``device=cuda``) consuming digits as float32
   messages from a Tansu broker, samples/s timed from the end of its first step, and its ratio to
   (1);
4. **``/assign/batch``** — points/s of ``oclust serve`` with ``OCLUST_DEVICE=cuda`` on 4096-point
   batches, JSON and binary (``application/octet-stream``) bodies.

CI has no GPU: without CUDA the script says so and exits 0 without measuring anything (with
``--json`` it prints ``{"cuda": false}``).

Run: ``.venv/bin/python benchmarks/bench_gpu.py [--json] [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from oclust.model import OnlineClusterer, datasets  # noqa: E402
from oclust.model.assign import combination_assignment  # noqa: E402

DEVICE = "cuda"  # --device cpu runs the same script on the CPU (a smoke test of the script)


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def memory_rate(X: np.ndarray, batch: int, steps: int, **params: object) -> tuple[float, float]:
    """(samples/s, seconds per step) of ``partial_fit`` on CUDA after 3 warm-up steps."""
    clf = OnlineClusterer(n_clusters=params.pop("n_clusters", 10), random_state=0,
                          device=DEVICE, **params)
    rng = np.random.default_rng(0)
    batches = [X[rng.choice(len(X), batch, replace=len(X) < batch)] for _ in range(steps + 3)]
    for b in batches[:3]:
        clf.partial_fit(b)
    _sync()
    t0 = time.perf_counter()
    for b in batches[3:]:
        clf.partial_fit(b)
    _sync()
    seconds = time.perf_counter() - t0
    return batch * steps / seconds, seconds / steps


def ca_share(n: int, k: int, repeats: int) -> dict[str, float]:
    """CA's time (one device→host copy of D, then the loop) against a CUDA step at N×K."""
    X = np.random.default_rng(0).normal(size=(n, 64)).astype(np.float32)
    _, step = memory_rate(X, n, repeats, n_clusters=k)
    d = torch.rand(n, k, device=DEVICE, dtype=torch.float32) * 10
    lp = np.full(k, -np.log(k))
    combination_assignment(d.cpu().numpy(), 20.0, lp)  # compile/warm
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        combination_assignment(d.cpu().numpy(), 20.0, lp)
    ca = (time.perf_counter() - t0) / repeats
    return {"step_s": step, "ca_s": ca, "ratio": ca / step}


async def kafka_rate(X: np.ndarray, n: int) -> float:
    """Samples/s of the worker on CUDA consuming float32 digits messages from Tansu."""
    from bench_worker import worker_rate

    from oclust.training_worker.devbroker import TansuBroker
    from oclust.training_worker.producer import replay

    with TansuBroker() as broker:
        topic = f"gpu-{uuid.uuid4().hex[:8]}"
        await replay(broker.bootstrap_servers, topic, "digits", limit=n + 512, loop=True,
                     binary=True, progress=False)
        return await worker_rate(broker.bootstrap_servers, topic, n, None, device=DEVICE)


def service_rates(seconds: float) -> dict[str, float]:
    """Points/s of ``/assign/batch`` (JSON and binary) served on CUDA."""
    import bench_service as bs

    tmp = Path(tempfile.mkdtemp(prefix="oclust-gpu-"))
    _, X = bs._publish_model(tmp / "store")
    rows = X[[i % len(X) for i in range(4096)]]
    json_body, raw_body = tmp / "batch.json", tmp / "batch.f32"
    json_body.write_text(json.dumps({"items": rows.tolist()}))
    raw_body.write_bytes(rows.astype("<f4").tobytes())
    port = bs._free_port()
    serve = [bs.PY, "-m", "oclust", "serve", "--store", f"file://{tmp / 'store'}",
             "--namespace", "bench", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "OCLUST_DEVICE": DEVICE}
    out = {}
    with bs._server(serve, port, env=env):
        for name, body, binary in (("json", json_body, False), ("binary", raw_body, True)):
            r = bs._load(port, "/assign/batch", body, binary=binary, duration=seconds,
                         connections=4)
            out[f"assign_batch_{name}_points_per_s"] = 4096 * r["rps"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--device", default="cuda", help="cuda[:i]; cpu only to try the script")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        if args.json:
            print(json.dumps({"cuda": False}))
        else:
            print("no CUDA device: bench_gpu measures the CUDA path only; nothing to do")
        return
    steps = 50 if args.quick else 200
    X, _ = datasets.load("digits")
    name = torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else "cpu"
    fig: dict[str, object] = {"cuda": DEVICE.startswith("cuda"), "device": name}
    for batch in (256, 1024):
        rate, step = memory_rate(X, batch, steps)
        fig[f"memory_samples_per_s_b{batch}"] = rate
        fig[f"step_s_b{batch}"] = step
    try:
        F, _ = datasets.load("fashion_mnist")
        fig["memory_samples_per_s_fmnist_convnet_b256"] = memory_rate(F, 256, steps // 2)[0]
    except (ValueError, OSError) as exc:  # the Debian package is not installed
        fig["fmnist_skipped"] = str(exc)
    for n, k in ((256, 10), (1024, 100)):
        share = ca_share(n, k, steps // 2)
        fig[f"ca_step_ratio_{n}x{k}"] = share["ratio"]
        fig[f"ca_s_{n}x{k}"] = share["ca_s"]
    kafka = asyncio.run(kafka_rate(X, 20_000 if args.quick else 60_000))
    fig["kafka_f32_samples_per_s"] = kafka
    fig["worker_f32_of_memory"] = kafka / float(fig["memory_samples_per_s_b256"])  # type: ignore[arg-type]
    fig |= service_rates(4.0 if args.quick else 10.0)
    if args.json:
        print(json.dumps(fig))
        return
    print(f"# figures on {fig['device']}\n")
    print("| figure | value |\n| --- | ---: |")
    for key, value in fig.items():
        if key in ("cuda", "device"):
            continue
        cell = f"{value:,.4g}" if isinstance(value, float) else str(value)
        print(f"| {key} | {cell} |")


if __name__ == "__main__":
    main()
