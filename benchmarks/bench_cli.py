"""Benchmark: how long ``oclust --help`` (and each command's ``--help``) takes to answer.

Target (issue 14): ``oclust --help`` in under 1 s. Each figure is the wall time of a fresh
process running the installed console script (``.venv/bin/oclust``, or ``python -m oclust`` with
``--module``), median and maximum over ``--runs`` runs, after one untimed warm-up run (the OS
file cache). The command modules import torch, NumPy and scikit-learn only when a command runs;
the script also checks that ``--help`` leaves them unimported.

Run: ``.venv/bin/python benchmarks/bench_cli.py [--runs 10] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("", "serve", "worker", "up", "train", "eval", "produce", "snapshots")
HEAVY = ("torch", "numpy", "sklearn", "numba")
_PROBE = (
    "import sys\nfrom oclust.service.cli import app\n"
    "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
    "print(' '.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)\n"
)


def _time(cmd: list[str], runs: int) -> tuple[float, float]:
    """(median, max) wall seconds of ``cmd`` over ``runs`` runs, after one warm-up."""
    subprocess.run(cmd, check=True, capture_output=True)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--module", action="store_true", help="time `python -m oclust` instead")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    script = Path(sys.executable).with_name("oclust")
    base = [sys.executable, "-m", "oclust"] if args.module or not script.exists() else [str(script)]
    rows = {}
    for command in COMMANDS:
        rows[command or "oclust"] = _time([*base, *([command] if command else []), "--help"],
                                          args.runs)
    probe = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY)], cwd=ROOT,
                           capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    heavy = probe.stderr.split()
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"help_s": round(rows["oclust"][0], 3),
                          "help_max_s": round(rows["oclust"][1], 3),
                          "heavy_imported": heavy, "load_average": round(load, 2)}))
        return
    print(f"`{' '.join(Path(b).name for b in base)} ... --help`, {args.runs} runs each, "
          f"load average {load:.2f}\n")
    print("| command | median | max |\n| --- | ---: | ---: |")
    for name, (med, worst) in rows.items():
        print(f"| `{name if name == 'oclust' else 'oclust ' + name} --help` | {med:.2f} s "
              f"| {worst:.2f} s |")
    print(f"\nheavy modules imported by `--help`: {', '.join(heavy) or 'none'}")


if __name__ == "__main__":
    main()
