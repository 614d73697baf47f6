"""Benchmark: exact combination assignment (numba) vs the naive greedy loops, and vs a train step.

Times, on the same distances (squared distances of random 128-d latents to K random centroids,
sigma = 100, uniform prior):
- the plain Python O(N^2 K) loop (the definition; one repetition at the large size),
- a vectorised-NumPy naive loop (one O(N K) cost matrix + argmin per step),
- ``oclust.model.assign.combination_assignment`` (compiled; first call reported separately),
and an MLP train step (64 -> 256 -> 256 -> 128, Adam, batch 256, forward + backward + step,
torch's default thread count) to show CA's share of a training step. All three assignments are
checked to return the same labels. Prints a markdown table.

Run: ``.venv/bin/python benchmarks/bench_assign.py`` (``--quick`` skips the slow Python loop at
the large size; ``--json`` prints only one JSON object with CA's share of the step at batch N,
``ca_step_ratio_1024x100`` and ``ca_step_ratio_256x10``, skipping the slow loops).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

SIGMA = 100.0
SIZES = [(256, 10, False), (1024, 100, False), (1024, 100, True)]


def time_call(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_distances(n: int, n_clusters: int, seed: int = 0, collapsed: bool = False) -> np.ndarray:
    """Squared distances of N random 128-d latents to K random centroids.

    ``collapsed``: every latent is the same point (a collapsed encoder), so each column of the
    distance matrix is one block of ties: the worst case for tie handling.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(1 if collapsed else n, 128)).repeat(n if collapsed else 1, axis=0)
    mu = rng.normal(size=(n_clusters, 128))
    return ((z[:, None, :] - mu[None, :, :]) ** 2).sum(-1)


def mlp_step_time(batch: int = 256, repeats: int = 200) -> float:
    """Median time of one Adam train step of a 64 -> 256 -> 256 -> 128 MLP at ``batch``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 128),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    x = torch.randn(batch, 64)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = net(x).pow(2).sum(1).mean()
        loss.backward()
        opt.step()

    for _ in range(50):  # first calls pay for lazy initialisation (up to ~10 ms)
        step()
    return time_call(step, repeats)


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the Python loop at N=1024")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object with CA's share of the step, nothing else")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from oclust.model.assign import combination_assignment
    from oclust.model.assign_reference import reference_assignment as python_loop
    from oclust.model.assign_reference import reference_assignment_vectorised as numpy_loop

    t0 = time.perf_counter()
    combination_assignment(make_distances(8, 3), SIGMA)
    first_call = time.perf_counter() - t0
    steps = {batch: mlp_step_time(batch) for batch in sorted({256, *(n for n, _, _ in SIZES)})}
    if args.json:
        ratios = {}
        for n, n_clusters in ((1024, 100), (256, 10)):
            d = make_distances(n, n_clusters)
            if not np.array_equal(combination_assignment(d, SIGMA), numpy_loop(d, SIGMA)):
                raise SystemExit(f"MISMATCH numpy loop vs numba CA at N={n}, K={n_clusters}")
            t_fast = time_call(lambda d=d: combination_assignment(d, SIGMA), 200)
            ratios[f"ca_step_ratio_{n}x{n_clusters}"] = round(t_fast / steps[n], 4)
        print(json.dumps(ratios))
        return

    print(f"torch threads: {torch.get_num_threads()}; sigma = {SIGMA}; uniform prior")
    print(f"first CA call in this process (compile or disk-cache load): {first_call * 1e3:.0f} ms")
    for batch, t_step in steps.items():
        print(f"MLP train step (64-256-256-128, Adam, batch {batch}): {t_step * 1e3:.3f} ms")
    print()
    print(
        "| N | K | batch | Python loop | NumPy loop | numba CA | speedup vs Python | "
        "speedup vs NumPy | CA / step at batch 256 | CA / step at batch N |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, n_clusters, collapsed in SIZES:
        d = make_distances(n, n_clusters, collapsed=collapsed)
        fast = combination_assignment(d, SIGMA)
        t_fast = time_call(lambda d=d: combination_assignment(d, SIGMA), 200)
        ref_np = numpy_loop(d, SIGMA)
        t_np = time_call(lambda d=d: numpy_loop(d, SIGMA), 3)
        if args.quick and n > 256:
            t_py, py_cell, py_ratio = math.nan, "skipped", "—"
        else:
            t0 = time.perf_counter()
            ref_py = python_loop(d, SIGMA)
            t_py = time.perf_counter() - t0
            if not np.array_equal(ref_py, fast):
                raise SystemExit(f"MISMATCH python loop vs numba CA at N={n}, K={n_clusters}")
            py_cell, py_ratio = f"{t_py:.3f} s", f"{t_py / t_fast:,.0f}x"
        if not np.array_equal(ref_np, fast):
            raise SystemExit(f"MISMATCH numpy loop vs numba CA at N={n}, K={n_clusters}")
        print(
            f"| {n} | {n_clusters} | {'collapsed' if collapsed else 'random'} | {py_cell} | "
            f"{t_np * 1e3:.1f} ms | {t_fast * 1e6:.0f} µs | "
            f"{py_ratio} | {t_np / t_fast:,.0f}x | {100 * t_fast / steps[256]:.1f}% | "
            f"{100 * t_fast / steps[n]:.1f}% |"
        )
    print("\nlabels identical across all implementations timed")


if __name__ == "__main__":
    main()
