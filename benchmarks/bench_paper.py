"""Benchmark: the CA paper's tables re-run on FashionMNIST and the HAPT windows, both protocols.

For each dataset (``fashion_mnist``: 70,000 images; ``hapt``: 10,411 windows of 6 × 128
readings) and protocol (``paper``: the authors' setup, :func:`oclust.model.presets.paper`;
``default``: the shipped configuration), every method runs ``--seeds`` seeds through
:func:`oclust.model.evaluation.evaluate` (batch 256, final epoch reported, never the best) and
reports mean (std) of ACC, NMI, ARI, hard and soft KL* (the paper's Tables 1 and 4) and the linear
and KNN (k=10) probe accuracies of the latents (Table 3), with KMeans and MiniBatchKMeans rows on
the same standardised data. The paper's own FashionMNIST row is printed beside ours.

Epochs: ``--epochs`` for FashionMNIST (default 2: one seed of one method stays within a few
minutes on 2 CPU cores), ``--hapt-epochs`` for HAPT (default 10: 41 steps per epoch).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_paper.py --jobs 2`` (the full table:
5 seeds, 13 rows, 2 datasets, 2 protocols: hours on 2 cores, minutes on a GPU). A slice:
``--datasets fashion_mnist --protocols paper --methods ca,none --seeds 1 --epochs 1
--no-reference``; ``--limit N`` keeps a seeded random N points of each dataset (smoke tests).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_quality import HEADERS as METRIC_HEADERS  # this folder is on sys.path
from bench_quality import (
    add_common_arguments,
    cell,
    check_methods,
    check_scores_file,
    names,
    run_all,
    write_scores,
)

from oclust.model.evaluation import METRICS, PROBES, evaluate, summarise
from oclust.model.presets import PRESETS

DATASETS = ("fashion_mnist", "hapt")
METHODS = ("ca", "sk", "ent", "ss", "ckm", "none", "drc", "tcc", "cm", "aecm", "varm")
COLUMNS = METRICS + PROBES
HEADERS = {**METRIC_HEADERS, "linear_probe": "linear", "knn_probe": "KNN"}
# The paper's FashionMNIST rows (Table 1), in %: ACC, NMI, ARI, KL* (hard).
PAPER_FASHION = {
    "ca": (59.3, 55.3, 42.5, 0.0),
    "sk": (25.1, 17.7, 9.2, 2.6),
    "ent": (25.5, 20.9, 10.6, 1.9),
    "ss": (10.0, 0.0, 0.0, 0.0),
    "ckm": (22.0, 15.8, 7.3, 1.3),
    "none": (10.0, 0.0, 0.0, float("nan")),
}
Task = tuple[str, str, str]  # dataset, protocol, method ("" = reference rows)


def run_task(
    task: Task, seeds: int, epochs: int, limit: int | None
) -> tuple[Task, dict[str, list[dict]], float]:
    """One dataset × protocol × method (or the reference rows), timed."""
    dataset, protocol, method = task
    start = time.perf_counter()
    res = evaluate(
        dataset, [method] if method else [], seeds=seeds, epochs=epochs, reference=not method,
        protocol=protocol, limit=limit, probes=True,
    )
    return task, res, time.perf_counter() - start


def table(rows: dict[str, list[dict]], seconds: dict[str, float]) -> str:
    """A markdown table: one row per method, mean (std) of every column, and its time."""
    lines = ["| method | " + " | ".join(HEADERS[m] for m in COLUMNS) + " | time |",
             "| --- |" + " ---: |" * (len(COLUMNS) + 1)]
    for name, runs in rows.items():
        s = summarise(runs)
        cells = " | ".join(cell(*s[m]) for m in COLUMNS)
        lines.append(f"| {name} | {cells} | {seconds.get(name, float('nan')):.0f} s |")
    return "\n".join(lines)


def paper_beside_ours(rows: dict[str, list[dict]]) -> str:
    """The paper's FashionMNIST row next to ours (in %, ACC / NMI / ARI / KL* hard)."""
    lines = ["| method | paper ACC/NMI/ARI/KL* | ours ACC/NMI/ARI/KL* |", "| --- | --- | --- |"]
    for name, ref in PAPER_FASHION.items():
        theirs = " / ".join("—" if math.isnan(v) else f"{v:.1f}" for v in ref)
        if name in rows:
            s = summarise(rows[name])
            ours = " / ".join(f"{100 * s[m][0]:.1f}" for m in METRICS[:3])
            ours += f" / {s['kl_star_hard'][0]:.2f}"
        else:
            ours = "not run"
        lines.append(f"| {name} | {theirs} | {ours} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, DATASETS, METHODS)
    parser.add_argument("--protocols", default=",".join(PRESETS))
    parser.add_argument("--epochs", type=int, default=2, help="FashionMNIST epochs")
    parser.add_argument("--hapt-epochs", type=int, default=10, help="HAPT epochs")
    parser.add_argument("--limit", type=int, default=None, help="a random subset per dataset")
    parser.add_argument("--no-reference", action="store_true", help="skip the KMeans rows")
    args = parser.parse_args(argv)
    datasets, protocols, methods = names(args.datasets), names(args.protocols), names(args.methods)
    check_methods(parser, methods)
    bad = [p for p in protocols if p not in PRESETS]
    if bad:
        parser.error(f"unknown protocols {bad}; choose from {', '.join(PRESETS)}")
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        parser.error(f"unknown datasets {bad}; choose from {', '.join(DATASETS)}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive number of points, got {args.limit}")

    meta = {"seeds": args.seeds, "epochs": args.epochs, "hapt_epochs": args.hapt_epochs,
            "limit": args.limit}
    check_scores_file(args.json, meta)
    extra = [] if args.no_reference else [""]
    tasks: list[Task] = [(d, p, m) for d in datasets for p in protocols for m in [*methods, *extra]]
    epochs = {"hapt": args.hapt_epochs}
    print(f"# Paper benchmark: {args.seeds} seed(s), FashionMNIST {args.epochs} epoch(s), "
          f"HAPT {args.hapt_epochs} epoch(s), batch 256, final epoch"
          + (f", {args.limit} points per dataset" if args.limit else "") + "\n", flush=True)
    start = time.perf_counter()
    per_task = [epochs.get(t[0], args.epochs) for t in tasks]
    n = len(tasks)
    done = run_all(run_task, tasks, args.jobs, [args.seeds] * n, per_task, [args.limit] * n)
    results: dict[tuple[str, str], dict[str, list[dict]]] = {
        (d, p): {} for d in datasets for p in protocols
    }
    seconds: dict[tuple[str, str], dict[str, float]] = {key: {} for key in results}
    for (d, p, _m), res, secs in done:
        results[(d, p)].update(res)
        for name in res:
            seconds[(d, p)][name] = secs
    for (d, p), rows in results.items():
        e = epochs.get(d, args.epochs)
        print(f"## {d}, {p} protocol ({e} epoch(s), {args.seeds} seed(s))\n")
        print(table(rows, seconds[(d, p)]) + "\n")
        if d == "fashion_mnist":
            print(f"### {d}, {p} protocol: the paper's Table 1 beside ours (%)\n")
            print(paper_beside_ours(rows) + "\n")
    print(f"total {time.perf_counter() - start:.0f} s with {args.jobs} job(s)")
    if args.json is not None:
        write_scores(args.json, meta, {f"{d}|{p}": rows for (d, p), rows in results.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
