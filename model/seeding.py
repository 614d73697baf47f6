"""Seeds of a run: its int seed, and the centroids seeded on the first batch's latents.

Example:
    >>> import numpy as np, torch
    >>> from oclust.model.seeding import seed_centroids
    >>> z = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    >>> mu = seed_centroids(z, 2, "kmeans", np.random.default_rng(0))
    >>> sorted(round(float(c), 2) for c in mu[:, 0])
    [0.05, 5.05]
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["centred_directions", "kmeans_pp", "resolve_seed", "seed_centroids"]


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
    z: torch.Tensor, n_clusters: int, init: str, rng: np.random.Generator
) -> torch.Tensor:
    """K initial centroids, shape (K, latent_dim), in ``z``'s dtype (device of ``z``, or CPU
    for ``"normal"``).

    ``"normal"`` draws N(0, 1), independent of the data (the CA paper's code); ``"centred"``
    (:func:`centred_directions`) spreads them around the batch's mean latent; ``"kmeans"`` runs
    a full k-means on the batch when it has at least K distinct latents; otherwise, and for
    ``"kmeans++"``, k-means++ seeding (:func:`kmeans_pp`). Every random number comes from ``rng``.
    """
    from sklearn.cluster import KMeans

    if init == "normal":  # the CA paper's code: N(0, 1), independent of the data
        draw = rng.standard_normal((n_clusters, z.shape[1]))
        return torch.as_tensor(draw, dtype=z.dtype)
    if init == "centred":
        return centred_directions(z, n_clusters, rng)
    zs = z.detach().double().cpu().numpy()
    if init == "kmeans" and len(np.unique(zs, axis=0)) >= n_clusters:
        seed = int(rng.integers(2**31))
        km = KMeans(n_clusters, n_init=4, random_state=seed).fit(zs)
        return torch.as_tensor(km.cluster_centers_, dtype=z.dtype)
    return kmeans_pp(z, n_clusters, rng)


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
