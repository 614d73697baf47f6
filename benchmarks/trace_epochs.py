"""Quality after each epoch: when does a run's partition settle? (issue 11)

Runs the evaluation protocol's ``fit`` (standardised data, shuffled batches of 256, a new order
every epoch) for each seed, and scores every point (nearest centroid, labels only score) at
the end of the epochs named by ``--marks``. ``fashion_mnist_flat`` is FashionMNIST as flat
784-value vectors (the MLP encoder), as in ``tune_defaults.py``. Prints NMI and hard KL* per
seed and their mean over seeds per epoch; ``--json`` prints them as one JSON object instead,
and ``--out F`` appends that object to the JSONL file F.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/trace_epochs.py
--dataset segments --candidate shipped``
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from tune_defaults import _load_flat, candidate  # this folder is on sys.path

from oclust.model import OnlineClusterer, datasets, evaluation
from oclust.model.report import StepReport

BATCH = 256


def trace(X: np.ndarray, y: np.ndarray, params: dict, seed: int, marks: list[int]) -> list[dict]:
    """Scores of one seed's run after each epoch in ``marks`` (the run lasts ``max(marks)``)."""
    k = int(y.max()) + 1
    clf = OnlineClusterer(n_clusters=k, seed=seed, **params)
    steps_per_epoch = -(-len(X) // BATCH)
    out: list[dict] = []
    steps = 0

    def on_step(_report: StepReport) -> None:
        nonlocal steps
        steps += 1
        if steps % steps_per_epoch == 0 and steps // steps_per_epoch in marks:
            s = evaluation.score(y, clf.predict(X), None, k)
            out.append({"epoch": steps // steps_per_epoch, "nmi": s["nmi"],
                        "kl_star_hard": s["kl_star_hard"]})

    clf.fit(X, epochs=max(marks), batch_size=BATCH, callback=on_step)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="segments",
                   choices=[*datasets.DATASETS, "fashion_mnist_flat"])
    p.add_argument("--candidate", default="shipped", help="as tune_defaults.py's")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--marks", default="1,2,3,5,10,20,40,80", help="epochs to score after")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument("--out", help="append the JSON object to this JSONL file")
    a = p.parse_args()
    marks = sorted({int(m) for m in a.marks.split(",")})
    if marks[0] < 1:
        p.error("--marks are epochs, counted from 1")
    X, y = _load_flat(a.dataset)  # datasets.load, plus FashionMNIST as flat vectors
    X = evaluation.prepare(X)
    runs = [trace(X, y, candidate(a.candidate), seed, marks) for seed in range(a.seeds)]
    mean = {key: [float(np.mean([r[i][key] for r in runs])) for i in range(len(marks))]
            for key in ("nmi", "kl_star_hard")}
    record = {"dataset": a.dataset, "candidate": a.candidate, "marks": marks, "runs": runs,
              "mean": mean}
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    if a.json:
        print(json.dumps(record))
        return
    print("epoch      " + " ".join(f"{m:>6d}" for m in marks))
    for seed, r in enumerate(runs):
        print(f"seed {seed} NMI " + " ".join(f"{e['nmi']:6.3f}" for e in r))
    print("mean   NMI " + " ".join(f"{v:6.3f}" for v in mean["nmi"]))
    print("mean   KL* " + " ".join(f"{v:6.3f}" for v in mean["kl_star_hard"]))


if __name__ == "__main__":
    main()
