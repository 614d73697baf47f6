"""Seeds of a run: its int seed, and the centroids seeded on the first batch (its latents, or
for ``init="inputs"`` its inputs).

Example:
    >>> import numpy as np, torch
    >>> from oclust.model.seeding import seed_centroids
    >>> z = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    >>> mu = seed_centroids(z, 2, "kmeans", np.random.default_rng(0))
    >>> sorted(round(float(c), 2) for c in mu[:, 0])
    [0.05, 5.05]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from sklearn.cluster import KMeans

__all__ = [
    "balanced_partition", "centred_directions", "kmeans", "kmeans_pp", "part_sizes", "resolve_seed",
    "seed_centroids", "seed_from_inputs",
]

SEED_POINTS = 1024  # "inputs" seeds from at most max(this, K) rows of the first batch


def resolve_seed(
    random_state: int | np.random.RandomState | np.random.Generator | None, seed: int | None
) -> int | None:
    """The int seed of a run: ``random_state`` (or, when it is None, ``seed``); a generator
    gives one draw.

    >>> resolve_seed(None, 3), resolve_seed(np.int64(5), 3)
    (3, 5)
    """
    state = random_state if random_state is not None else seed
    if isinstance(state, np.random.RandomState):
        return int(state.randint(2**31 - 1))
    if isinstance(state, np.random.Generator):
        return int(state.integers(2**31 - 1))
    return None if state is None else int(state)


def seed_centroids(
    z: torch.Tensor,
    n_clusters: int,
    init: str,
    rng: np.random.Generator,
    x: torch.Tensor | None = None,
    prior: np.ndarray | None = None,
) -> torch.Tensor:
    """K initial centroids, shape (K, latent_dim), in ``z``'s dtype (on ``z``'s device for
    ``"inputs"`` and k-means++, on the CPU otherwise: the caller copies them into place).

    ``"normal"`` draws N(0, 1), independent of the data (the CA paper's code); ``"centred"``
    (:func:`centred_directions`) spreads them around the batch's mean latent; ``"kmeans"`` runs
    a full k-means on the batch's latents when it has at least K distinct ones, and
    ``"inputs"`` (:func:`seed_from_inputs`) partitions the batch's inputs ``x`` into parts sized
    by ``prior`` (uniform when None) when they hold at least K distinct rows; otherwise, and
    for ``"kmeans++"``, k-means++ seeding (:func:`kmeans_pp`). Every random number comes from
    ``rng``.
    """
    if init == "normal":  # the CA paper's code: N(0, 1), independent of the data
        draw = rng.standard_normal((n_clusters, z.shape[1]))
        return torch.as_tensor(draw, dtype=z.dtype)
    if init == "centred":
        return centred_directions(z, n_clusters, rng)
    if init == "inputs":
        if x is None:
            raise ValueError('init="inputs" seeds from the batch\'s inputs: pass x')
        p = np.full(n_clusters, 1.0 / n_clusters) if prior is None else np.asarray(prior)
        seeded = seed_from_inputs(z, x, p, rng)
        return kmeans_pp(z, n_clusters, rng) if seeded is None else seeded
    zs = z.detach().double().cpu().numpy()
    if init == "kmeans" and len(np.unique(zs, axis=0)) >= n_clusters:
        return torch.as_tensor(kmeans(zs, n_clusters, rng).cluster_centers_, dtype=z.dtype)
    return kmeans_pp(z, n_clusters, rng)


def kmeans(points: np.ndarray, n_clusters: int, rng: np.random.Generator) -> KMeans:
    """scikit-learn's k-means of ``points``, fitted with 4 starts seeded from ``rng``."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters, n_init=4, random_state=int(rng.integers(2**31))).fit(points)


def seed_from_inputs(
    z: torch.Tensor, x: torch.Tensor, prior: np.ndarray, rng: np.random.Generator
) -> torch.Tensor | None:
    """The mean latent (``z``) of each part of :func:`balanced_partition` of the inputs ``x``
    (flattened; as the model sees them, standardised unless ``standardize=False``), parts sized
    by ``prior``; None when the rows used hold fewer than K distinct inputs. A batch of more
    than ``max(SEED_POINTS, K)`` rows is seeded from that many, drawn at random: the
    assignment's cost table is N × N.

    >>> z = torch.tensor([[1.0], [2.0], [3.0], [10.0]])
    >>> x = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    >>> seed_from_inputs(z, x, np.array([0.5, 0.5]), np.random.default_rng(0)).flatten().tolist()
    [1.5, 6.5]
    """
    k = len(prior)
    keep = max(SEED_POINTS, k)
    if len(x) > keep:
        rows = torch.as_tensor(rng.choice(len(x), keep, replace=False), device=x.device)
        x, z = x[rows], z[rows]
    xs = x.detach().reshape(len(x), -1).double().cpu().numpy()
    if len(np.unique(xs, axis=0)) < k:
        return None
    labels = balanced_partition(xs, prior, rng) if k > 1 else np.zeros(len(xs), dtype=np.int64)
    zs = z.detach().double().cpu().numpy()
    means = np.stack([zs[labels == j].mean(0) for j in range(k)])
    return torch.as_tensor(means, dtype=z.dtype, device=z.device)


def balanced_partition(x: np.ndarray, prior: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels of a k-means partition of ``x`` (N, D), N >= K, balanced to the prior: part k
    holds :func:`part_sizes` points. k-means places the K centres, and the parts take them in
    order of size (the largest part the centre of the largest k-means cluster); then each point
    takes one place of a part, at the least total squared distance (an optimal assignment,
    scipy's ``linear_sum_assignment``, over one column per place).

    >>> x = np.array([[0.0], [0.1], [0.2], [0.3], [9.0], [9.1]])
    >>> balanced_partition(x, np.array([2 / 3, 1 / 3]), np.random.default_rng(0)).tolist()
    [0, 0, 0, 0, 1, 1]
    >>> balanced_partition(x, np.array([0.5, 0.5]), np.random.default_rng(0)).tolist()
    [1, 1, 1, 0, 0, 0]

    (k-means splits 4 against 2; under the uniform prior 0.3, the point it costs least to
    move, joins the far part.)
    """
    from scipy.optimize import linear_sum_assignment

    k = len(prior)
    km = kmeans(x, k, rng)
    sizes = part_sizes(len(x), prior)
    counts = np.bincount(km.labels_, minlength=k)
    by_rank = np.empty(k, dtype=np.int64)  # the largest part takes the largest cluster's centre
    by_rank[np.argsort(sizes, kind="stable")] = np.argsort(counts, kind="stable")
    c = km.cluster_centers_[by_rank]  # part j's centre
    cost = (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None]  # (N, K) squared distances
    rows, places = linear_sum_assignment(np.repeat(cost, sizes, axis=1))
    labels = np.empty(len(x), dtype=np.int64)
    labels[rows] = np.repeat(np.arange(k), sizes)[places]
    return labels


def part_sizes(n: int, prior: np.ndarray) -> np.ndarray:
    """K sizes that sum to ``n`` (>= K), each at least 1 and as close to ``n * prior`` as that
    allows (the floors, then one more for the parts left furthest under their share).

    >>> part_sizes(10, np.array([0.5, 0.3, 0.2])).tolist()
    [5, 3, 2]
    >>> part_sizes(4, np.array([0.97, 0.01, 0.01, 0.01])).tolist()
    [1, 1, 1, 1]
    """
    exact = n * np.asarray(prior, dtype=np.float64)
    sizes = np.maximum(np.floor(exact), 1).astype(np.int64)
    while sizes.sum() > n:  # the one place every part keeps overshot: take from the most over
        sizes[np.argmax(np.where(sizes > 1, sizes - exact, -np.inf))] -= 1
    sizes[np.argsort(sizes - exact, kind="stable")[: n - sizes.sum()]] += 1
    return sizes


def centred_directions(
    z: torch.Tensor, n_clusters: int, rng: np.random.Generator
) -> torch.Tensor:
    """The batch's mean latent plus K random directions of equal length sqrt(latent_dim), the
    typical length of an N(0, 1) draw (CPU tensor).

    Raw latents of a fresh encoder lie close together, away from the origin. Against plain
    N(0, 1) centroids their nearest centroid is the one of smallest norm for nearly every
    sample, so a model serves one cluster for its first 10-20 steps. Centred on the latents and
    of equal length, the centroids split the batch by direction from its first step, and still
    carry nothing of its partition: the encoder finds its own, as with N(0, 1) centroids.

    >>> z = torch.full((4, 3), 5.0)
    >>> mu = centred_directions(z, 2, np.random.default_rng(0))
    >>> [round(float(n), 3) for n in (mu - 5.0).norm(dim=1)]
    [1.732, 1.732]
    """
    draw = rng.standard_normal((n_clusters, z.shape[1]))
    draw *= np.sqrt(z.shape[1]) / np.linalg.norm(draw, axis=1, keepdims=True)
    centre = z.detach().double().mean(0).cpu().numpy()
    return torch.as_tensor(centre + draw, dtype=z.dtype)


def kmeans_pp(z: torch.Tensor, n_clusters: int, rng: np.random.Generator) -> torch.Tensor:
    """k-means++ seeding: spread-out first batch points, no centroid far from the data."""
    z = z.detach()
    n = z.shape[0]
    chosen = [int(rng.integers(n))]
    d2 = ((z - z[chosen[0]]) ** 2).sum(1)
    for _ in range(1, n_clusters):
        p = d2.double().cpu().numpy()
        total = p.sum()
        idx = int(rng.choice(n, p=p / total)) if total > 0 else int(rng.integers(n))
        chosen.append(idx)
        d2 = torch.minimum(d2, ((z - z[idx]) ** 2).sum(1))
    return z[chosen]
