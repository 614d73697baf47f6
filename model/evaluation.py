"""The evaluation harness: stream a dataset in batches, then score every point by nearest centroid.

Protocol (the paper's): standardise the features, shuffle, stream batches of 256 for E epochs per
seed, then assign every point by nearest centroid and score ACC, NMI, ARI and KL* (hard and soft,
against the true class frequencies with clusters aligned to classes). The final epoch is reported,
never the best one: labels are used only for scoring. KMeans and MiniBatchKMeans rows on the same
standardised data are the reference.

Example:
    >>> from model.evaluation import evaluate
    >>> res = evaluate("digits", ["ca"], seeds=1, epochs=1)
    >>> sorted(res["ca"][0])
    ['acc', 'ari', 'kl_star_hard', 'kl_star_soft', 'nmi']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from model import datasets, metrics
from model.clusterer import OnlineClusterer

__all__ = [
    "DEFAULT_EPOCHS",
    "IMBALANCE_PROFILES",
    "METRICS",
    "PRIOR_CHOICES",
    "evaluate",
    "imbalance_profile",
    "score",
    "subsample_imbalanced",
    "summarise",
]

DEFAULT_EPOCHS = 40
METRICS = ("acc", "nmi", "ari", "kl_star_hard", "kl_star_soft")
Scores = dict[str, float]

# Share of each class kept by the paper's imbalanced profiles (class 0 first), for 10 classes.
IMBALANCE_PROFILES: dict[str, tuple[float, ...]] = {
    "imb1": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.95, 0.9, 0.85, 0.8),
    "imb2": tuple(round(1.0 - 0.05 * i, 2) for i in range(10)),  # 1, .95, ..., .55
    "imb3": tuple(round(1.0 - 0.1 * i, 2) for i in range(10)),  # 1, .9, ..., .1
}
PRIOR_CHOICES = ("uniform", "true", "online")


def imbalance_profile(name: str, k: int) -> np.ndarray:
    """The share of each of K classes kept by a profile, linearly interpolated from 10 classes.

    >>> imbalance_profile("imb3", 10)[[0, 9]].tolist()
    [1.0, 0.1]
    >>> imbalance_profile("imb3", 4).round(2).tolist()
    [1.0, 0.7, 0.4, 0.1]
    """
    if name not in IMBALANCE_PROFILES:
        raise ValueError(
            f"unknown imbalance profile {name!r}; choose from {', '.join(IMBALANCE_PROFILES)}"
        )
    if k < 1:
        raise ValueError(f"need at least one class, got k={k}")
    base = np.asarray(IMBALANCE_PROFILES[name], dtype=np.float64)
    if k == 1:
        return base[:1].copy()
    return np.interp(np.linspace(0.0, 1.0, k), np.linspace(0.0, 1.0, len(base)), base)


def subsample_imbalanced(
    X: np.ndarray, y: np.ndarray, profile: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep round(share_c * n_c) random samples of each class c (at least one), seeded.

    >>> import numpy as np
    >>> y = np.repeat(np.arange(10), 10)
    >>> np.bincount(subsample_imbalanced(y[:, None], y, "imb3", 0)[1]).tolist()
    [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    """
    k = int(y.max()) + 1
    shares = imbalance_profile(profile, k)
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(k):
        idx = np.flatnonzero(y == c)
        if len(idx):
            n_keep = max(1, int(np.rint(shares[c] * len(idx))))
            keep.append(rng.choice(idx, size=n_keep, replace=False))
    sel = np.sort(np.concatenate(keep))
    return X[sel], y[sel]


def _prior_option(prior: str, y: np.ndarray, k: int) -> str | list[float] | None:
    """The clusterer's ``prior`` for an eval prior choice."""
    if prior == "uniform":
        return None
    if prior == "online":
        return "online"
    if prior == "true":
        freq = np.bincount(y, minlength=k).astype(np.float64)
        freq = np.maximum(freq, 1e-6)
        return (freq / freq.sum()).tolist()
    raise ValueError(f"unknown prior {prior!r}; choose from {', '.join(PRIOR_CHOICES)}")


def score(y: np.ndarray, pred: np.ndarray, soft: np.ndarray | None, k: int) -> Scores:
    """ACC, NMI, ARI and KL* (hard, and soft when responsibilities are given)."""
    return {
        "acc": metrics.cluster_acc(y, pred),
        "nmi": metrics.nmi(y, pred),
        "ari": metrics.ari(y, pred),
        "kl_star_hard": metrics.kl_star_hard(pred, k, y),
        "kl_star_soft": metrics.kl_star_soft(soft, y) if soft is not None else float("nan"),
    }


def _kmeans(X: np.ndarray, y: np.ndarray, k: int, seed: int) -> Scores:
    from sklearn.cluster import KMeans

    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(X.reshape(len(X), -1))
    return score(y, pred, None, k)


def _minibatch_kmeans(
    X: np.ndarray, y: np.ndarray, k: int, seed: int, epochs: int, batch_size: int
) -> Scores:
    from sklearn.cluster import MiniBatchKMeans

    flat = X.reshape(len(X), -1)
    mbk = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(flat))
        for start in range(0, len(flat), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) >= k:  # partial_fit needs at least K samples
                mbk.partial_fit(flat[idx])
    return score(y, mbk.predict(flat), None, k)


def evaluate(
    dataset: str,
    regularisers: Sequence[str],
    seeds: int = 3,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 256,
    reference: bool = False,
    on_step: Callable[[], None] | None = None,
    imbalance: str | None = None,
    prior: str = "uniform",
    **params: Any,
) -> dict[str, list[Scores]]:
    """Run the protocol for each regulariser and seed; returns per-seed scores by name.

    ``reference=True`` adds ``KMeans`` and ``MiniBatchKMeans`` rows. ``params`` go to
    :class:`OnlineClusterer` (e.g. ``sigma``, ``latent_dim``). ``imbalance`` (``imb1``, ``imb2``,
    ``imb3``) subsamples the dataset by the paper's profile, a fresh subsample per seed;
    ``prior`` is ``uniform``, ``true`` (the class frequencies of the evaluated data) or
    ``online`` (estimated from the stream).
    """
    if datasets.ALIASES.get(dataset, dataset) == "daphnet":
        raise ValueError("daphnet is a reading stream: window it with the worker, not eval")
    if imbalance is not None and imbalance not in IMBALANCE_PROFILES:
        raise ValueError(
            f"unknown imbalance profile {imbalance!r}; choose from {', '.join(IMBALANCE_PROFILES)}"
        )
    if prior not in PRIOR_CHOICES:
        raise ValueError(f"unknown prior {prior!r}; choose from {', '.join(PRIOR_CHOICES)}")
    X_all, y_all = datasets.load(dataset)
    k = int(y_all.max()) + 1
    data = []
    for seed in range(seeds):
        X, y = (X_all, y_all) if imbalance is None else subsample_imbalanced(
            X_all, y_all, imbalance, seed
        )
        data.append((datasets.standardize(X), y))
    results: dict[str, list[Scores]] = {}
    for name in regularisers:
        results[name] = []
        for seed, (X, y) in enumerate(data):
            clf = OnlineClusterer(
                n_clusters=k, regulariser=name, seed=seed, prior=_prior_option(prior, y, k),
                **params,
            )
            clf.fit(X, epochs=epochs, batch_size=batch_size, callback=lambda _r: _tick(on_step))
            pred = clf.predict(X)
            results[name].append(score(y, pred, clf.soft_assign(X), k))
    if reference:
        results["KMeans"] = [_kmeans(X, y, k, s) for s, (X, y) in enumerate(data)]
        results["MiniBatchKMeans"] = [
            _minibatch_kmeans(X, y, k, s, epochs, batch_size) for s, (X, y) in enumerate(data)
        ]
    return results


def _tick(on_step: Callable[[], None] | None) -> None:
    if on_step is not None:
        on_step()


def summarise(runs: list[Scores]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation of each metric over seeds."""
    return {
        m: (float(np.mean([r[m] for r in runs])), float(np.std([r[m] for r in runs])))
        for m in METRICS
    }
