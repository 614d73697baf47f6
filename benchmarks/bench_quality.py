"""Benchmark: clustering quality of every regulariser, paper-style (mean (std) over seeds).

Runs :func:`oclust.model.evaluation.evaluate` (the paper's protocol: standardise, stream shuffled
batches of 256 for E epochs, score every point by nearest centroid, final epoch reported) for
each regulariser on digits, ImageSegments and BasicMotions, balanced and subsampled by the
paper's ``imb3`` profile (1, .9, ..., .1 of each class), with the clusterer's defaults
(sigma, latent normalisation, encoder) and KMeans / MiniBatchKMeans reference rows. Prints one
markdown table per dataset and setting (ACC, NMI, ARI, KL* hard and soft), then an overview of
ACC and NMI.

Settings are ``balanced`` or ``PROFILE:PRIOR`` with PROFILE in imb1/imb2/imb3 and PRIOR in
uniform/true/online (``true`` = the subsample's class frequencies, ``online`` = estimated from
the stream).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_quality.py`` (full: 5 seeds, 40
epochs; slow on 2 cores). Reduced: ``--seeds 3 --epochs 20``; ``--json out.json`` also writes
every per-seed score, merged into the file if it exists (a re-run method replaces its rows).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oclust.model import clusterer
from oclust.model.evaluation import DEFAULT_EPOCHS, METRICS, evaluate, summarise
from oclust.model.regularisers import REGULARISERS

DATASETS = ("digits", "segments", "basic_motions")
METHODS = ("ca", "sk", "ent", "ss", "varm", "cm", "aecm", "ckm", "drc", "tcc", "none")
SETTINGS = ("balanced", "imb3:true", "imb3:online")
HEADERS = {"acc": "ACC", "nmi": "NMI", "ari": "ARI", "kl_star_hard": "KL* hard",
           "kl_star_soft": "KL* soft"}
Task = tuple[str, str, str]  # dataset, setting, method ("" = reference rows)


def parse_setting(setting: str) -> tuple[str | None, str]:
    """``balanced`` -> (None, "uniform"); ``imb3:online`` -> ("imb3", "online")."""
    if setting == "balanced":
        return None, "uniform"
    profile, _, prior = setting.partition(":")
    return profile, prior or "uniform"


def run_task(task: Task, seeds: int, epochs: int) -> tuple[Task, dict[str, list[dict]], float]:
    """One dataset × setting × method (or the reference rows), timed."""
    dataset, setting, method = task
    imbalance, prior = parse_setting(setting)
    start = time.perf_counter()
    res = evaluate(
        dataset, [method] if method else [], seeds=seeds, epochs=epochs,
        reference=not method, imbalance=imbalance, prior=prior,
    )
    return task, res, time.perf_counter() - start


def cell(mean: float, std: float) -> str:
    """``mean (std)`` with three decimals, a dash for NaN."""
    return "—" if math.isnan(mean) else f"{mean:.3f} ({std:.3f})"


def add_common_arguments(
    parser: argparse.ArgumentParser, datasets: tuple[str, ...], methods: tuple[str, ...]
) -> None:
    """The options both quality benchmarks take: what to run, seeds, jobs, where scores go."""
    parser.add_argument("--datasets", default=",".join(datasets))
    parser.add_argument("--methods", default=",".join(methods))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--json", type=Path, default=None,
                        help="write per-seed scores here, merged into the file if it exists")


def check_scores_file(path: Path | None, meta: dict[str, Any]) -> None:
    """Refuse, before any run, a ``--json`` file written with other settings (``meta``: seeds,
    epochs, ...): its rows and this run's could not share one table."""
    if path is None or not path.exists():
        return
    old = json.loads(path.read_text())
    other = {key: old.get(key) for key in meta if old.get(key) != meta[key]}
    if other:
        raise SystemExit(f"{path} holds runs with {other}, this run has "
                         f"{ {key: meta[key] for key in other} }: write to another file")


def write_scores(path: Path, meta: dict[str, Any], results: dict[str, dict[str, list]]) -> None:
    """Write ``meta`` and the per-seed ``results`` (by table key, then method) to ``path``; if it
    exists, merge: this run's methods replace theirs, every other row is kept.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "scores.json"
    >>> write_scores(f, {"seeds": 1}, {"digits|balanced": {"ca": [1], "sk": [2]}})
    >>> write_scores(f, {"seeds": 1}, {"digits|balanced": {"ca": [3]}, "segments|balanced": {}})
    >>> json.loads(f.read_text())["results"]
    {'digits|balanced': {'ca': [3], 'sk': [2]}, 'segments|balanced': {}}
    """
    check_scores_file(path, meta)
    merged = json.loads(path.read_text())["results"] if path.exists() else {}
    for key, rows in results.items():
        merged.setdefault(key, {}).update(rows)
    path.write_text(json.dumps({**meta, "results": merged}, indent=1))


def names(arg: str) -> list[str]:
    """The non-empty items of a comma-separated option."""
    return [a for a in arg.split(",") if a]


def check_methods(parser: argparse.ArgumentParser, methods: list[str]) -> None:
    """Exit with a usage error naming the methods that are not regularisers."""
    unknown = [m for m in methods if m not in REGULARISERS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(sorted(REGULARISERS))}")


def run_all(
    run_task: Callable[..., tuple[Task, dict[str, list[dict]], float]],
    tasks: list[Task],
    jobs: int,
    *per_task: list[Any],
) -> list[tuple[Task, dict[str, list[dict]], float]]:
    """``run_task(task, *its per_task values)`` for every task, in ``jobs`` processes (or in
    this one), in the order of ``tasks``; a progress line on stderr as each one finishes."""

    def progress(result: tuple[Task, dict[str, list[dict]], float], k: int) -> None:
        (d, s, m), _, secs = result
        print(f"  [{k}/{len(tasks)}] done {d} {s} {m or 'reference'} in {secs:.1f}s",
              file=sys.stderr, flush=True)

    args = list(zip(tasks, *per_task, strict=True))
    if jobs <= 1:
        done = []
        for a in args:
            done.append(run_task(*a))
            progress(done[-1], len(done))
        return done
    with ProcessPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_task, *a) for a in args]
        for k, fut in enumerate(as_completed(futures), 1):
            progress(fut.result(), k)
        return [fut.result() for fut in futures]


def table(rows: dict[str, dict[str, list[dict]]]) -> str:
    """A markdown table: one row per method, mean (std) of every metric."""
    lines = ["| method | " + " | ".join(HEADERS[m] for m in METRICS) + " |",
             "| --- |" + " ---: |" * len(METRICS)]
    for name, runs in rows.items():
        s = summarise(runs)
        lines.append(f"| {name} | " + " | ".join(cell(*s[m]) for m in METRICS) + " |")
    return "\n".join(lines)


def overview(results: dict[tuple[str, str], dict[str, list[dict]]], metric: str) -> str:
    """Methods × (dataset, setting) for one metric."""
    cols = list(results)
    names: list[str] = []
    for rows in results.values():
        names += [n for n in rows if n not in names]
    lines = ["| method | " + " | ".join(f"{d} {s}" for d, s in cols) + " |",
             "| --- |" + " ---: |" * len(cols)]
    for name in names:
        cells = []
        for col in cols:
            runs = results[col].get(name)
            cells.append(cell(*summarise(runs)[metric]) if runs else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, DATASETS, METHODS)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    args = parser.parse_args(argv)
    datasets, methods, settings = names(args.datasets), names(args.methods), names(args.settings)
    check_methods(parser, methods)

    meta = {"seeds": args.seeds, "epochs": args.epochs}
    check_scores_file(args.json, meta)
    tasks: list[Task] = [(d, s, m) for d in datasets for s in settings for m in [*methods, ""]]
    reduced = args.seeds < 5 or args.epochs < DEFAULT_EPOCHS
    print(f"# Quality benchmark: {args.seeds} seed(s), {args.epochs} epoch(s), batch 256"
          + (" — REDUCED SCALE (paper protocol: 5 seeds, 40 epochs)" if reduced else ""))
    print(f"clusterer defaults: sigma={clusterer.DEFAULT_SIGMA} (windows and raw latents of the "
          f"image encoder: {clusterer.WIDE_SIGMA}), latent_dim={clusterer.DEFAULT_LATENT_DIM}, "
          "views on for images with ca; "
          f"settings: {', '.join(settings)}\n")
    sys.stdout.flush()

    results: dict[tuple[str, str], dict[str, list[dict]]] = {
        (d, s): {} for d in datasets for s in settings
    }
    timing: dict[Task, float] = {}
    start = time.perf_counter()
    done = run_all(run_task, tasks, args.jobs, [args.seeds] * len(tasks),
                   [args.epochs] * len(tasks))
    for (d, s, m), res, secs in done:
        results[(d, s)].update(res)
        timing[(d, s, m)] = secs
    for (d, s), rows in results.items():
        order = [m for m in methods if m in rows] + [n for n in rows if n not in methods]
        print(f"## {d}, {s}\n")
        print(table({n: rows[n] for n in order}) + "\n")
    for metric in ("acc", "nmi", "kl_star_hard"):
        print(f"## Overview: {HEADERS[metric]}\n")
        print(overview(results, metric) + "\n")
    slowest = sorted(timing.items(), key=lambda kv: -kv[1])[:5]
    print(f"total {time.perf_counter() - start:.0f}s; slowest: "
          + ", ".join(f"{d}/{s}/{m or 'reference'} {t:.0f}s" for (d, s, m), t in slowest))
    if args.json is not None:
        write_scores(args.json, meta, {f"{d}|{s}": rows for (d, s), rows in results.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
