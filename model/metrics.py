"""Collapse and quality metrics (ARCHITECTURE.md §1.3).

All entropies and divergences are in nats. Distributions are 1-D arrays that sum to one.

Example:
    >>> import numpy as np
    >>> from oclust.model import metrics
    >>> h = metrics.cluster_distribution(np.array([0, 0, 1, 2]), 3)
    >>> h.round(2).tolist()
    [0.5, 0.25, 0.25]
    >>> round(metrics.entropy(h), 4)
    1.0397
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ari",
    "cluster_acc",
    "cluster_distribution",
    "entropy",
    "hard_entropy",
    "hungarian_map",
    "js_divergence",
    "kl_star",
    "kl_star_hard",
    "kl_star_soft",
    "nmi",
    "soft_distribution",
    "soft_entropy",
]

EPS = 1e-12


def cluster_distribution(labels: np.ndarray, k: int, smoothing: float = 0.0) -> np.ndarray:
    """Histogram of hard labels over ``k`` clusters, with additive (Dirichlet) smoothing."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)[:k].astype(np.float64)
    counts += smoothing
    total = counts.sum()
    return counts / total if total > 0 else np.full(k, 1.0 / k)


def soft_distribution(q: np.ndarray) -> np.ndarray:
    """Mean soft assignment over the rows of an N×K responsibility matrix."""
    mean = np.asarray(q, dtype=np.float64).mean(axis=0)
    return mean / max(mean.sum(), EPS)


def entropy(p: np.ndarray) -> float:
    """Shannon entropy of a distribution (0 log 0 = 0); one cluster gives 0.0, not -0.0.

    >>> entropy(np.array([1.0, 0.0])), round(entropy(np.array([0.5, 0.5])), 4)
    (0.0, 0.6931)
    """
    p = np.asarray(p, dtype=np.float64)
    nz = p[p > 0]
    return max(0.0, float(-(nz * np.log(nz)).sum()))  # -(1 log 1) is -0.0: shown "-0.000"


def hard_entropy(labels: np.ndarray, k: int) -> float:
    """Entropy of the histogram of hard labels; its maximum is log k."""
    return entropy(cluster_distribution(labels, k))


def soft_entropy(q: np.ndarray) -> float:
    """Entropy of the mean soft assignment."""
    return entropy(soft_distribution(q))


def kl_star(q: np.ndarray, ref: np.ndarray) -> float:
    """KL(q || ref): the model's cluster distribution against the reference (prior or classes).

    ``ref`` is floored at a tiny value so an empty reference bin cannot make the result infinite.
    """
    q = np.asarray(q, dtype=np.float64)
    ref = np.maximum(np.asarray(ref, dtype=np.float64), EPS)
    nz = q > 0
    return float((q[nz] * np.log(q[nz] / ref[nz])).sum())


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (bounded by log 2); used for drift between windows."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    m = 0.5 * (p + q)
    return 0.5 * kl_star(p, m) + 0.5 * kl_star(q, m)


def hungarian_map(y_true: np.ndarray, y_pred: np.ndarray) -> dict[int, int]:
    """Cluster → class mapping maximising agreement (scipy's ``linear_sum_assignment``)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    n = int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1
    w = np.zeros((n, n), dtype=np.int64)
    np.add.at(w, (y_pred, y_true), 1)
    from scipy.optimize import linear_sum_assignment  # lazy: a serving replica needs no scipy

    rows, cols = linear_sum_assignment(-w)
    return {int(r): int(c) for r, c in zip(rows, cols, strict=True)}


def cluster_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Clustering accuracy after the best one-to-one matching of clusters to classes.

    Any labels (negative, sparse, strings): only which samples share one counts.

    >>> cluster_acc([-1, -1, 0, 0], [0, 0, 1, 1]), cluster_acc([0, 0, 10**6], [5, 5, -1])
    (1.0, 1.0)
    """
    y_true, y_pred = _same_length(y_true, y_pred)
    if y_true.size == 0:
        return 0.0
    classes = np.unique(y_true, return_inverse=True)[1]  # 0..C-1, as many as there are
    clusters = np.unique(y_pred, return_inverse=True)[1]
    mapping = hungarian_map(classes, clusters)
    mapped = np.array([mapping[int(c)] for c in clusters], dtype=np.int64)
    return float((mapped == classes).mean())


def _same_length(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both label arrays (1-D), ``ValueError`` unless there is one label of each per sample."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels and y_pred {len(y_pred)}: one of "
                         "each per sample")
    return y_true, y_pred


def nmi(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Normalised mutual information (scikit-learn, arithmetic mean normalisation)."""
    from sklearn.metrics import normalized_mutual_info_score  # lazy, as above

    return float(normalized_mutual_info_score(y_true, y_pred))


def ari(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Adjusted Rand index (scikit-learn)."""
    from sklearn.metrics import adjusted_rand_score  # lazy, as above

    return float(adjusted_rand_score(y_true, y_pred))


def _check_classes(y_true: np.ndarray) -> None:
    """``ValueError`` for a negative class (the classes are histogram bins, 0, 1, ...)."""
    if y_true.size and y_true.min() < 0:
        raise ValueError(f"y_true must hold classes 0, 1, ... (non-negative), got {y_true.min()}")


def _bins(k: int, y_true: np.ndarray | None) -> int:
    """Bins to compare over: the clusters, or the classes where there are more of those (with
    fewer clusters than classes the class histogram over k bins dropped the other classes and
    renormalised, so one cluster against ten classes scored 0)."""
    if y_true is None:
        return k
    return max(k, int(np.max(np.asarray(y_true, dtype=np.int64), initial=-1)) + 1)


def _reference(k: int, y_true: np.ndarray | None, prior: np.ndarray | None) -> np.ndarray:
    if y_true is not None:
        return cluster_distribution(y_true, k)
    if prior is not None:
        return np.asarray(prior, dtype=np.float64)
    return np.full(k, 1.0 / k)


def _align(q: np.ndarray, y_true: np.ndarray | None, y_pred: np.ndarray) -> np.ndarray:
    """Reorder cluster masses to the classes they match (Hungarian), for a non-uniform reference."""
    if y_true is None:
        return q
    mapping = hungarian_map(y_true, y_pred)
    k = q.shape[0]
    out = np.zeros(k)
    for cluster, cls in mapping.items():
        if cluster < k and cls < k:
            out[cls] += q[cluster]
    return out


def kl_star_hard(
    y_pred: np.ndarray,
    k: int,
    y_true: np.ndarray | None = None,
    prior: np.ndarray | None = None,
) -> float:
    """KL* of the hard-label histogram against the class frequencies (or the prior, or uniform).

    Against classes, over as many bins as there are clusters or classes, whichever is more:

    >>> import numpy as np
    >>> round(kl_star_hard(np.zeros(10, int), 1, np.arange(10)), 3)  # log 10: all in one
    2.303

    ``ValueError`` for a cluster outside 0..k-1 or a negative class (the histograms count
    labels as bins).
    """
    y_pred = np.asarray(y_pred)
    if y_pred.size and (y_pred.min() < 0 or y_pred.max() >= k):
        raise ValueError(f"y_pred holds clusters outside 0..{k - 1}: "
                         f"{y_pred.min()}..{y_pred.max()}")
    if y_true is not None:
        _check_classes(_same_length(y_true, y_pred)[0])
    n = _bins(k, y_true)
    q = _align(cluster_distribution(y_pred, n), y_true, y_pred)
    return kl_star(q, _reference(n, y_true, prior))


def kl_star_soft(
    q_soft: np.ndarray,
    y_true: np.ndarray | None = None,
    prior: np.ndarray | None = None,
) -> float:
    """KL* of the summed soft assignments against the class frequencies (or the prior);
    ``ValueError`` for a negative class."""
    y_pred = np.asarray(q_soft).argmax(axis=1)
    if y_true is not None:
        _check_classes(_same_length(y_true, y_pred)[0])
    n = _bins(q_soft.shape[1], y_true)
    q = np.pad(soft_distribution(q_soft), (0, n - q_soft.shape[1]))
    return kl_star(_align(q, y_true, y_pred), _reference(n, y_true, prior))
