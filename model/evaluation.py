"""The evaluation harness: stream a dataset in batches, then score every point by nearest centroid.

Protocol (the paper's): standardise the features, shuffle, stream batches of 256 for E epochs per
seed (:func:`default_epochs`: about 400 steps and at most 40 epochs, or the authors' 10 under
``protocol="paper"``), then assign every
point by nearest centroid and score ACC, NMI, ARI and KL* (hard and soft, against the true class
frequencies with clusters aligned to classes). The final epoch is reported,
never the best one: labels are used only for scoring. KMeans and MiniBatchKMeans rows on the same
standardised data are the reference.

``protocol="default"`` trains the shipped configuration; ``protocol="paper"`` the CA paper's
(:func:`oclust.model.presets.paper`: LeNet-style encoders, raw latents, N(0, 1) centroids, sigma 50
in our parametrisation, Adam betas (0.9, 0.99), images fed in [0, 1] without standardisation).
The authors' code scores every epoch and reports the one of best NMI (chosen with the labels);
this harness reports the final epoch under both protocols. ``probes=True`` adds linear and KNN
(k=10) probe accuracies of the latents (fit on a seeded 80% of the points, scored on the other
20%).

Example:
    >>> from oclust.model.evaluation import evaluate
    >>> res = evaluate("digits", ["ca"], seeds=1, epochs=1)
    >>> sorted(res["ca"][0])
    ['acc', 'ari', 'kl_star_hard', 'kl_star_soft', 'nmi']
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from oclust.model import datasets, metrics, presets
from oclust.model.clusterer import OnlineClusterer
from oclust.model.encoders import IMAGE_KINDS, EncoderConfig

__all__ = [
    "DEFAULT_EPOCHS",
    "IMBALANCE_PROFILES",
    "METRICS",
    "PRIOR_CHOICES",
    "PROBES",
    "RESERVED_PARAMS",
    "check_model_params",
    "check_reference_batches",
    "default_epochs",
    "evaluate",
    "imbalance_profile",
    "prepare",
    "probe_scores",
    "score",
    "subsample_imbalanced",
    "subset",
    "summarise",
]

DEFAULT_EPOCHS = 40  # at most, under the default protocol
STEP_BUDGET = 400  # the default protocol's training steps when no epochs are asked for
METRICS = ("acc", "nmi", "ari", "kl_star_hard", "kl_star_soft")
PROBES = ("linear_probe", "knn_probe")
Scores = dict[str, float]

# Share of each class kept by the paper's imbalanced profiles (class 0 first), for 10 classes.
IMBALANCE_PROFILES: dict[str, tuple[float, ...]] = {
    "imb1": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.95, 0.9, 0.85, 0.8),
    "imb2": tuple(round(1.0 - 0.05 * i, 2) for i in range(10)),  # 1, .95, ..., .55
    "imb3": tuple(round(1.0 - 0.1 * i, 2) for i in range(10)),  # 1, .9, ..., .1
}
PRIOR_CHOICES = ("uniform", "true", "online")
#: OnlineClusterer parameters :func:`evaluate` sets for each run, which its ``params`` cannot
RESERVED_PARAMS = ("n_clusters", "regulariser", "seed", "random_state")


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


def probe_scores(Z: np.ndarray, y: np.ndarray, seed: int) -> Scores:
    """Linear (logistic regression) and KNN (k=10) accuracy of latents Z, 80/20 seeded split."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    order = np.random.default_rng(seed).permutation(len(Z))
    cut = int(0.8 * len(Z))
    tr, te = order[:cut], order[cut:]
    scaler = StandardScaler().fit(Z[tr])
    Ztr, Zte = scaler.transform(Z[tr]), scaler.transform(Z[te])
    with warnings.catch_warnings():  # a probe capped at 300 lbfgs iterations is still a probe
        warnings.simplefilter("ignore", ConvergenceWarning)
        linear = LogisticRegression(max_iter=300).fit(Ztr, y[tr])
    knn = KNeighborsClassifier(n_neighbors=10).fit(Ztr, y[tr])
    return {"linear_probe": float(linear.score(Zte, y[te])),
            "knn_probe": float(knn.score(Zte, y[te]))}


def default_epochs(protocol: str, n_samples: int | None = None, batch_size: int = 256) -> int:
    """Epochs of a protocol when none are asked for: the authors' 10 for ``paper``; under the
    default protocol enough for about :data:`STEP_BUDGET` steps of ``batch_size``, at most
    :data:`DEFAULT_EPOCHS` (40 for the small sets, 10 for the HAPT windows, 2 for the 70,000
    FashionMNIST images: one seed in minutes on a CPU).

    >>> default_epochs("paper"), default_epochs("default", 1797), default_epochs("default", 70_000)
    (10, 40, 2)
    """
    if protocol == "paper":
        return presets.PAPER_EPOCHS
    if n_samples is None:
        return DEFAULT_EPOCHS
    return min(DEFAULT_EPOCHS, math.ceil(STEP_BUDGET / math.ceil(n_samples / batch_size)))


def prepare(X: np.ndarray, standardize: bool = True) -> np.ndarray:
    """Standardise a dataset for the protocol (unless told not to: the paper protocol's images
    stay in [0, 1]); single-channel images gain their channel axis.

    >>> prepare(np.ones((4, 28, 28), dtype=np.float32)).shape
    (4, 1, 28, 28)
    >>> float(prepare(np.full((2, 28, 28), 0.5, dtype=np.float32), standardize=False).max())
    0.5
    """
    if X.ndim == 3 and EncoderConfig.for_shape(X.shape[1:]).kind in IMAGE_KINDS:
        X = X[:, None]  # (N, H, W) → (N, 1, H, W): one global statistic, not one per row
    return datasets.standardize(X) if standardize else np.asarray(X, dtype=np.float32)


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
    epochs: int | None = None,
    batch_size: int = 256,
    reference: bool = False,
    on_step: Callable[[], None] | None = None,
    imbalance: str | None = None,
    prior: str = "uniform",
    protocol: str = "default",
    limit: int | None = None,
    probes: bool = False,
    **params: Any,
) -> dict[str, list[Scores]]:
    """Run the protocol for each regulariser and seed; returns per-seed scores by name.

    ``epochs`` defaults to :func:`default_epochs` for the dataset's size (after ``limit``).
    ``reference=True`` adds ``KMeans`` and ``MiniBatchKMeans`` rows. ``params`` go to
    :class:`OnlineClusterer` (e.g. ``sigma``, ``latent_dim``), except those the protocol sets
    for each run (:data:`RESERVED_PARAMS`: ``ValueError``). ``imbalance`` (``imb1``, ``imb2``,
    ``imb3``) subsamples the dataset by the paper's profile, a fresh subsample per seed;
    ``prior`` is ``uniform``, ``true`` (the class frequencies of the evaluated data) or
    ``online`` (estimated from the stream).
    """
    reserved = sorted(set(params) & set(RESERVED_PARAMS))
    if reserved:
        raise ValueError(f"evaluate sets {', '.join(reserved)} itself (K: the dataset's classes; "
                         "the seed: 0, 1, ... per run; the regulariser: from regularisers)")
    if datasets.ALIASES.get(dataset, dataset) == "daphnet":
        raise ValueError("daphnet is a reading stream: window it with the worker, not eval")
    if imbalance is not None and imbalance not in IMBALANCE_PROFILES:
        raise ValueError(
            f"unknown imbalance profile {imbalance!r}; choose from {', '.join(IMBALANCE_PROFILES)}"
        )
    if prior not in PRIOR_CHOICES:
        raise ValueError(f"unknown prior {prior!r}; choose from {', '.join(PRIOR_CHOICES)}")
    X_all, y_all = subset(*datasets.load(dataset), limit)
    k = int(y_all.max()) + 1
    if reference:
        check_reference_batches(batch_size, len(X_all), k)
    epochs = epochs or default_epochs(protocol, len(X_all), batch_size)
    config = _model_config(protocol, prepare(X_all[:2]).shape[1:], k, params)
    standardize = bool(config.get("standardize", True))  # the paper's images: as loaded
    data = []
    for seed in range(seeds):
        X, y = (X_all, y_all) if imbalance is None else subsample_imbalanced(
            X_all, y_all, imbalance, seed
        )
        data.append((prepare(X, standardize), y))
    results: dict[str, list[Scores]] = {}
    for name in regularisers:
        results[name] = []
        for seed, (X, y) in enumerate(data):
            clf = OnlineClusterer(
                n_clusters=k, regulariser=name, seed=seed, prior=_prior_option(prior, y, k),
                **config,
            )
            clf.fit(X, epochs=epochs, batch_size=batch_size, callback=lambda _r: _tick(on_step))
            pred, soft, Z = _outputs(clf, X)
            scores = score(y, pred, soft, k)
            if probes:
                scores |= probe_scores(Z, y, seed)
            results[name].append(scores)
    if reference:
        nan_probes = dict.fromkeys(PROBES, float("nan")) if probes else {}
        results["KMeans"] = [_kmeans(X, y, k, s) | nan_probes for s, (X, y) in enumerate(data)]
        results["MiniBatchKMeans"] = [
            _minibatch_kmeans(X, y, k, s, epochs, batch_size) | nan_probes
            for s, (X, y) in enumerate(data)
        ]
    return results


def _model_config(protocol: str, shape: tuple[int, ...], k: int, params: dict[str, Any]
                  ) -> dict[str, Any]:
    """The protocol's ``OnlineClusterer`` keywords for samples of ``shape``, ``params`` over
    them (K and the regulariser are set per run)."""
    config = presets.preset(protocol, shape, k)
    config = {key: v for key, v in config.items() if key not in ("n_clusters", "regulariser")}
    return config | params


def check_model_params(protocol: str, X: np.ndarray, k: int, **params: Any) -> None:
    """``ValueError`` unless the protocol's model, ``params`` over its own, can be built for the
    samples ``X`` with ``k`` clusters: checked before any training, as :func:`evaluate` builds it
    only at its first batch.

    >>> check_model_params("default", np.zeros((4, 64), np.float32), 10, latent_dim=2)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: latent_dim must be at least 3 with LayerNorm latents (...), got 2: ...
    """
    shape = prepare(X[:2]).shape[1:]
    OnlineClusterer(n_clusters=k, **_model_config(protocol, shape, k, params)).validate_params(
        shape)


def check_reference_batches(batch_size: int, n_points: int, k: int) -> None:
    """``ValueError`` when the reference rows cannot run: MiniBatchKMeans skips every batch of
    fewer than K points, KMeans needs K points in all.

    >>> check_reference_batches(256, 100, 10)  # batches of 100: enough
    >>> check_reference_batches(4, 100, 10)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: batches of 4 points are fewer than K = 10 classes: the MiniBatchKMeans ...
    """
    if min(batch_size, n_points) >= k:
        return
    which = "MiniBatchKMeans" if n_points >= k else "KMeans and MiniBatchKMeans"
    raise ValueError(
        f"batches of {min(batch_size, n_points)} points are fewer than K = {k} classes: "
        f"the {which} reference needs at least {k}"
    )


def subset(X: np.ndarray, y: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The protocol's random subset of ``limit`` points (seeded, in data order), or all.
    ``ValueError`` when it drops a class: K is the dataset's class count, and KL* against sizes
    of zero would be meaningless.

    >>> subset(np.arange(10.0), np.arange(10) % 2, 3)[1].tolist()
    [1, 0, 1]
    """
    if limit is None:
        return X, y
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if limit >= len(X):
        return X, y
    keep = np.sort(np.random.default_rng(0).choice(len(X), size=int(limit), replace=False))
    present, classes = len(np.unique(y[keep])), len(np.unique(y))
    if present < classes:
        raise ValueError(
            f"a subset of {limit} points holds {present} of the dataset's {classes} classes; "
            "raise the limit"
        )
    return X[keep], y[keep]


def _outputs(
    clf: OnlineClusterer, X: np.ndarray, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest-centroid labels, responsibilities and latents, in chunks (bounded memory)."""
    preds, softs, zs = [], [], []
    for start in range(0, len(X), chunk):
        part = X[start : start + chunk]
        preds.append(clf.predict(part))
        softs.append(clf.soft_assign(part))
        zs.append(clf.transform(part))
    return np.concatenate(preds), np.concatenate(softs), np.concatenate(zs)


def _tick(on_step: Callable[[], None] | None) -> None:
    if on_step is not None:
        on_step()


def summarise(runs: list[Scores]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation of each metric over seeds (every metric the runs have)."""
    return {
        m: (float(np.mean([r[m] for r in runs])), float(np.std([r[m] for r in runs])))
        for m in runs[0]
    }
