"""Screen candidate default configurations of CA across data sets (issue 11, "defaults that win").

Each run appends one JSON line (dataset, candidate, seeds, epochs, limit, per-seed scores, wall
seconds) to ``--out``. Candidates are judged on the *selection* data sets and then confirmed on
the others; labels only score, as in ``oclust.model.evaluation``. ``fashion_mnist_flat`` is
FashionMNIST sent as flat 784-value vectors (the MLP encoder), the way many producers send images.

    PYTHONPATH=$PWD python benchmarks/tune_defaults.py --dataset digits --candidate shipped
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from oclust.model import datasets, evaluation

CANDIDATES: dict[str, dict[str, Any]] = {
    # the clusterer's defaults when the row ran, so "shipped" rows of the JSONL differ by date:
    # LayerNorm / k-means / 10 for every encoder up to stop 24 (spell it layer_kmeans_s10 now),
    # raw latents / centred / 50 for images from stop 25, windows at sigma 50 (layer_kmeans_s50)
    # and images with augmented views from stop 26, an MLP with BatchNorm from stop 27
    # (its rows before that: add _nobn), and vectors with CA's input guide from stop 32 (its
    # rows before that: layer_kmeans_s10_ng)
    "shipped": {},
    "reference": {},  # KMeans / MiniBatchKMeans rows only
    "mbk": {},  # the MiniBatchKMeans row only (KMeans with n_init=10 is slow on 70k images)
    "layer_s25": {"latent_norm": "layer", "init": "kmeans", "sigma": 25.0},
    "layer_s50": {"latent_norm": "layer", "init": "kmeans", "sigma": 50.0},
    "layer_s5": {"latent_norm": "layer", "init": "kmeans", "sigma": 5.0},
    "layer_normal_s10": {"latent_norm": "layer", "init": "normal", "sigma": 10.0},
    "raw_normal_s50": {"latent_norm": "none", "init": "normal", "sigma": 50.0},
    "raw_kmeans_s50": {"latent_norm": "none", "init": "kmeans", "sigma": 50.0},
}
EPOCHS = {
    "digits": 40, "segments": 40, "basic_motions": 40, "hapt": 10, "fashion_mnist": 2,
    "fashion_mnist_flat": 2,
    # held out (stop 29): small tabular sets that ship with scikit-learn and River, kept out of
    # every tuning choice, to test a claim about tabular vectors made on the sets above
    "iris": 40, "wine": 40, "breast_cancer": 40, "phishing": 40, "bananas": 40,
}

_load = datasets.load
NORMS = {"layer": "layer", "raw": "none", "batch": "batch"}


def candidate(name: str) -> dict[str, Any]:
    """A named candidate, or one spelled ``NORM_INIT_sSIGMA[_lrLR][_hW-W][_dDIM][_v][_nobn][_ng]``
    (``_v``: augmented views on; ``_nobn``: an MLP without BatchNorm, the default before stop 27;
    ``_ng``: no input guide, the default before stop 32).

    >>> candidate("raw_normal_s25_h256-128_v")
    {'latent_norm': 'none', 'init': 'normal', 'sigma': 25.0, 'hidden': (256, 128), 'views': True}
    """
    if name in CANDIDATES:
        return CANDIDATES[name]
    norm, init, sigma, *rest = name.split("_")
    cfg: dict[str, Any] = {"latent_norm": NORMS[norm], "init": init, "sigma": float(sigma[1:])}
    for part in rest:
        if part.startswith("lr"):
            cfg["lr"] = float(part[2:])
        elif part.startswith("h"):
            cfg["hidden"] = tuple(int(w) for w in part[1:].split("-"))
        elif part.startswith("d"):
            cfg["latent_dim"] = int(part[1:])
        elif part == "v":
            cfg["views"] = True
        elif part == "nobn":
            cfg["hidden_norm"] = "none"
        elif part == "ng":
            cfg["input_guide"] = 0
        else:
            raise ValueError(f"unknown candidate part {part!r}")
    return cfg


def _river(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A classification set that ships in River's wheel, as float32 features and labels 0..C-1."""
    from river import datasets as river_datasets

    rows = list(getattr(river_datasets, name)())
    X = np.array([[float(v) for v in x.values()] for x, _ in rows], dtype=np.float32)
    return X, np.unique(np.array([t for _, t in rows]), return_inverse=True)[1]


def _held_out(name: str) -> tuple[np.ndarray, np.ndarray]:
    """One of the held-out tabular sets (installed with scikit-learn and River; no download)."""
    from sklearn import datasets as sk_datasets

    if name in ("phishing", "bananas"):
        X, y = _river(name.capitalize())
    else:
        X, y = getattr(sk_datasets, f"load_{name}")(return_X_y=True)
    return np.asarray(X, dtype=np.float32), np.asarray(y, dtype=np.int64)


HELD_OUT = ("iris", "wine", "breast_cancer", "phishing", "bananas")


def _load_flat(name: str) -> tuple:
    """``datasets.load``, plus ``fashion_mnist_flat`` (the images as 784-value vectors) and the
    held-out tabular sets."""
    if name == "fashion_mnist_flat":
        X, y = _load("fashion_mnist")
        return X.reshape(len(X), -1), y
    if name in HELD_OUT:
        return _held_out(name)
    return _load(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", required=True, choices=sorted(EPOCHS))
    p.add_argument("--candidate", required=True, help="a name of CANDIDATES or NORM_INIT_sSIGMA")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int)
    p.add_argument("--limit", type=int)
    p.add_argument("--regulariser", default="ca")
    p.add_argument("--imbalance", help="imb1, imb2 or imb3 (a fresh subsample per seed)")
    p.add_argument("--prior", default="uniform", help="uniform, true or online")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed .. +seeds-1 (not for the reference rows, seeds 0..)")
    p.add_argument("--out", default="tune_results.jsonl")
    a = p.parse_args()
    datasets.load = _load_flat
    datasets.ALIASES.setdefault("fashion_mnist_flat", "fashion_mnist_flat")
    epochs = a.epochs or EPOCHS[a.dataset]
    if a.first_seed:  # shift the clusterer's seeds (ca/none rows; reference rows use 0..)
        cls = evaluation.OnlineClusterer
        evaluation.OnlineClusterer = lambda **kw: cls(**{**kw, "seed": kw["seed"] + a.first_seed})
    ref = a.candidate == "reference"
    t0 = time.perf_counter()
    if a.candidate == "mbk":
        X, y = datasets.load(a.dataset)
        X, k = evaluation.prepare(X), int(y.max()) + 1
        seeds = range(a.first_seed, a.first_seed + a.seeds)
        res = {"MiniBatchKMeans": [
            evaluation._minibatch_kmeans(X, y, k, s, epochs, 256) for s in seeds
        ]}
    else:
        res = evaluation.evaluate(
            a.dataset, [] if ref else [a.regulariser], seeds=a.seeds, epochs=epochs,
            reference=ref, limit=a.limit, imbalance=a.imbalance, prior=a.prior,
            **candidate(a.candidate),
        )
    wall = time.perf_counter() - t0
    for name, runs in res.items():
        s = evaluation.summarise(runs)
        row = {"dataset": a.dataset, "candidate": a.candidate, "method": name, "seeds": a.seeds,
               "first_seed": a.first_seed, "epochs": epochs, "limit": a.limit,
               "imbalance": a.imbalance, "prior": a.prior,
               "wall_s": round(wall, 1), "runs": runs}
        with open(a.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{a.dataset} {a.imbalance or ''} {a.prior} {a.candidate} {name} e{epochs} "
              f"n{a.limit} seeds{a.seeds} "
              f"NMI {s['nmi'][0]:.3f} ({s['nmi'][1]:.3f}) ACC {s['acc'][0]:.3f} "
              f"KL {s['kl_star_hard'][0]:.3f} ({s['kl_star_hard'][1]:.3f}) wall {wall:.0f}s",
              flush=True)


if __name__ == "__main__":
    main()
