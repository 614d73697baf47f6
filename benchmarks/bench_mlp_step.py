"""Benchmark: training throughput of the default MLP with and without its hidden BatchNorm.

``OnlineClusterer.partial_fit`` on random vectors of D features (batches of 256, one torch
thread, K = 10, the defaults otherwise), for three variants timed in turn in one process:

- ``plain``: ``hidden_norm="none"``, the MLP before stop 27 (one pass per step);
- ``bn_separate``: the BatchNorm MLP with the step's inference pass (the served labels) run
  through the whole encoder, as for the convolutional encoders;
- ``bn_shared``: the shipped step, whose inference and training pass share the MLP's first
  Linear layer (``oclust.model.encoders.split_stem``).

Prints samples/s (best of ``--reps`` runs of ``--steps`` steps after a first) and the ratios of
the BatchNorm variants to ``plain``, then the serving kernel's time (``export()``, the compiled
pipeline a replica runs) for one sample and for a batch of 4,096, with and without BatchNorm;
``--json`` prints one JSON object of the ratios.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_mlp_step.py``
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from bench_assign import time_call  # this folder is on sys.path
from torch import nn

from oclust.model import OnlineClusterer, clusterer

BATCH = 256
Split = Callable[[nn.Module], tuple[nn.Module | None, nn.Module]]


def _unshared(encoder: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    return None, encoder


VARIANTS: dict[str, tuple[str, Split]] = {
    "plain": ("none", clusterer.split_stem),
    "bn_separate": ("batch", _unshared),
    "bn_shared": ("batch", clusterer.split_stem),
}


def samples_per_second(X: np.ndarray, hidden_norm: str, split: Split, steps: int) -> float:
    """Samples/s of ``steps`` training steps after a first (which builds the model)."""
    clusterer.split_stem = split  # the step looks it up in its module at every call
    clf = OnlineClusterer(10, seed=0, hidden_norm=hidden_norm, device="cpu")
    clf.partial_fit(X[:BATCH])
    t = time.perf_counter()
    for i in range(1, steps + 1):
        clf.partial_fit(X[i * BATCH : (i + 1) * BATCH])
    return steps * BATCH / (time.perf_counter() - t)


def serving_seconds(X: np.ndarray, hidden_norm: str) -> tuple[float, float]:
    """Median seconds of the compiled serving pipeline on one sample and on 4,096."""
    clf = OnlineClusterer(10, seed=0, hidden_norm=hidden_norm, device="cpu")
    serve = clf.partial_fit(X[:BATCH]).partial_fit(X[BATCH : 2 * BATCH]).export()
    one, many = X[:1], X[:4096]

    return time_call(lambda: serve(one), 2000), time_call(lambda: serve(many), 20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="64,561,784", help="comma-separated feature counts")
    p.add_argument("--steps", type=int, default=39)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print only the ratios, as one object")
    a = p.parse_args()
    torch.set_num_threads(1)
    shipped = clusterer.split_stem
    ratios: dict[str, float] = {}
    try:
        for d in (int(v) for v in a.dims.split(",")):
            X = np.random.default_rng(0).normal(size=((a.steps + 1) * BATCH, d))
            best = {name: 0.0 for name in VARIANTS}
            for _ in range(a.reps):  # interleaved, so a slow spell hits every variant
                for name, (hidden_norm, split) in VARIANTS.items():
                    rate = samples_per_second(X.astype(np.float32), hidden_norm, split, a.steps)
                    best[name] = max(best[name], rate)
            for name in ("bn_separate", "bn_shared"):
                ratios[f"{name}_over_plain_d{d}"] = round(best[name] / best["plain"], 3)
            plain, bn = (serving_seconds(X.astype(np.float32), n) for n in ("none", "batch"))
            ratios[f"serve_one_bn_over_plain_d{d}"] = round(bn[0] / plain[0], 3)
            ratios[f"serve_4096_bn_over_plain_d{d}"] = round(bn[1] / plain[1], 3)
            if not a.json:
                print(f"D={d}: " + ", ".join(f"{k} {v:,.0f} samples/s" for k, v in best.items())
                      + f"; over plain: separate {ratios[f'bn_separate_over_plain_d{d}']:.2f}, "
                      f"shared {ratios[f'bn_shared_over_plain_d{d}']:.2f}; serving one sample "
                      f"{plain[0] * 1e6:.1f} / {bn[0] * 1e6:.1f} us, 4,096 {plain[1] * 1e3:.1f} "
                      f"/ {bn[1] * 1e3:.1f} ms (plain / BatchNorm)", flush=True)
    finally:
        clusterer.split_stem = shipped
    if a.json:
        print(json.dumps(ratios))


if __name__ == "__main__":
    main()
