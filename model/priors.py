"""Cluster priors for imbalanced streams: uniform, a fixed vector, or estimated online.

The prior p over the K clusters enters the regularisers as ``log_prior`` (CA trades
``2 sigma (log(n_k + 1) - log p_k)`` against distance, so a non-uniform prior lets an imbalanced
stream keep imbalanced clusters). When the class frequencies are unknown, :class:`OnlinePrior`
estimates them from the stream.

The estimate must not be read off the regulariser's own labels: CA (and SK) turn any prior into
label shares that follow it, so an average of those labels makes every prior a fixed point and
a drift towards one cluster feeds itself. :class:`OnlinePrior` instead takes the EM update of
the mixture weights from *prior-free* soft responsibilities ``r_ik = softmax_k(-D_ik / (2
sigma))`` of the step's (detached) squared distances, which no prior enters:

    m_k <- decay * m_k + sum_i r_ik                  (discounted soft counts)
    q_k  = (m_k + alpha) / (sum_j m_j + K alpha)     (Dirichlet(alpha) posterior mean)
    p    = (1 - shrink) q + shrink / K               (shrunk toward uniform)

and, when ``KL(p || uniform)`` exceeds ``max_kl``, p is mixed with the uniform until the KL
equals the cap (the KL is convex and decreasing along that segment: a bisection finds the
point). Until ``warmup`` samples have been folded in, :attr:`OnlinePrior.probs` stays uniform
(early centroids say little about the cluster sizes). The state is saved in the snapshot
manifest (``prior_state``, ``version`` 2). A version-1 state (the old EMA of the regulariser's
own hard labels, the signal that can learn collapse) is not trusted: its settings are kept, its
counts are dropped, and the estimate starts again from uniform through the warm-up.

Example:
    >>> import numpy as np
    >>> from oclust.model.priors import OnlinePrior
    >>> est = OnlinePrior(3, decay=0.9, shrink=0.1, max_kl=0.2, warmup=0)
    >>> rng = np.random.default_rng(0)
    >>> centres = np.array([0.0, 10.0, 20.0])
    >>> for _ in range(200):
    ...     x = centres[rng.choice(3, size=256, p=[0.6, 0.3, 0.1])] + rng.normal(size=256)
    ...     _ = est.update_from_distances((x[:, None] - centres) ** 2, sigma=1.0)
    >>> np.round(est.probs, 2).tolist()
    [0.58, 0.3, 0.12]
    >>> round(est.kl_to_uniform(), 3) <= est.max_kl
    True
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["SETTINGS", "OnlinePrior", "cap_kl_to_uniform", "parse_prior", "resolve_prior"]

STATE_VERSION = 2
SETTINGS = ("decay", "alpha", "shrink", "max_kl", "warmup")  # OnlinePrior's keyword arguments


def _kl_to_uniform(p: np.ndarray) -> float:
    """KL(p || uniform) = log K - H(p), nats."""
    q = p[p > 0]
    return float(math.log(len(p)) + np.sum(q * np.log(q)))


def cap_kl_to_uniform(p: np.ndarray, max_kl: float) -> np.ndarray:
    """Mix ``p`` with the uniform just enough that KL(p || uniform) <= ``max_kl``.

    >>> p = cap_kl_to_uniform(np.array([0.9, 0.1]), 0.1)
    >>> round(math.log(2) + float(np.sum(p * np.log(p))), 6)
    0.1
    """
    if _kl_to_uniform(p) <= max_kl:
        return p
    u = np.full(len(p), 1.0 / len(p))
    lo, hi = 0.0, 1.0  # weight of the uniform: KL > cap at lo, <= cap at hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _kl_to_uniform((1 - mid) * p + mid * u) > max_kl:
            lo = mid
        else:
            hi = mid
    return (1 - hi) * p + hi * u


class OnlinePrior:
    """Online estimate of the cluster frequencies from prior-free soft responsibilities.

    Args:
        n_clusters: K.
        decay: per-batch discount of the past soft counts, in [0, 1).
        alpha: symmetric Dirichlet concentration (pseudo-count per cluster), > 0 and finite.
        shrink: weight of the uniform mixed into the estimate, in [0, 1].
        max_kl: cap on KL(prior || uniform), nats, >= 0 (the imb3 profile is 0.15 at K = 10).
        warmup: samples to fold in before the estimate replaces the uniform, >= 0.
    """

    def __init__(
        self,
        n_clusters: int,
        decay: float = 0.995,
        alpha: float = 1.0,
        shrink: float = 0.5,
        max_kl: float = 0.1,
        warmup: int = 8192,
    ) -> None:
        if not isinstance(n_clusters, int) or n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive integer, got {n_clusters!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if not 0 < alpha < math.inf:
            raise ValueError(f"alpha must be positive and finite, got {alpha!r}")
        if not 0.0 <= shrink <= 1.0:
            raise ValueError(f"shrink must be in [0, 1], got {shrink!r}")
        if not max_kl >= 0:
            raise ValueError(f"max_kl must be non-negative, got {max_kl!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
        self.n_clusters = n_clusters
        self.decay = float(decay)  # plain numbers: the state is JSON in the manifest
        self.alpha = float(alpha)
        self.shrink = float(shrink)
        self.max_kl = float(max_kl)
        self.warmup = int(warmup)
        self.counts = np.zeros(n_clusters, dtype=np.float64)
        self.seen = 0

    @staticmethod
    def responsibilities(distances: np.ndarray, sigma: float) -> np.ndarray:
        """Prior-free soft responsibilities softmax(-D / (2 sigma)) of N×K squared distances."""
        d = np.asarray(distances, dtype=np.float64)
        logits = -d / (2.0 * sigma)
        logits -= logits.max(axis=1, keepdims=True)
        r = np.exp(logits)
        return r / r.sum(axis=1, keepdims=True)

    def update_from_distances(self, distances: np.ndarray, sigma: float) -> np.ndarray:
        """Fold one batch's N×K squared distances in; returns the new :attr:`probs`."""
        d = np.asarray(distances, dtype=np.float64)
        if d.ndim != 2 or d.shape[1] != self.n_clusters or not np.isfinite(d).all():
            raise ValueError(
                f"distances must be a finite N x {self.n_clusters} matrix, got shape {d.shape}"
            )
        return self.update(self.responsibilities(d, sigma))

    def update(self, responsibilities: np.ndarray) -> np.ndarray:
        """Fold one batch of soft responsibilities (N×K, rows sum to 1) into the estimate."""
        r = np.asarray(responsibilities, dtype=np.float64)
        if r.ndim != 2 or r.shape[1] != self.n_clusters:
            raise ValueError(
                f"responsibilities must be an N x {self.n_clusters} matrix, got shape {r.shape}"
            )
        if r.size and (not np.isfinite(r).all() or r.min() < 0
                       or not np.allclose(r.sum(axis=1), 1.0, atol=1e-4)):
            raise ValueError("responsibilities must be non-negative rows that sum to 1")
        self.counts = self.decay * self.counts + r.sum(axis=0)
        self.seen += len(r)
        return self.probs

    @property
    def warm(self) -> bool:
        """True once ``warmup`` samples have been folded in."""
        return self.seen >= self.warmup

    def estimate(self) -> np.ndarray:
        """The shrunk, capped estimate, whether or not the warm-up is over."""
        k = self.n_clusters
        q = (self.counts + self.alpha) / (self.counts.sum() + k * self.alpha)
        p = (1.0 - self.shrink) * q + self.shrink / k
        p = cap_kl_to_uniform(p, self.max_kl)
        return p / p.sum()

    @property
    def probs(self) -> np.ndarray:
        """The prior in use: positive, sums to one, uniform until the warm-up is over."""
        if not self.warm:
            return np.full(self.n_clusters, 1.0 / self.n_clusters)
        return self.estimate()

    def kl_to_uniform(self) -> float:
        """KL(:attr:`probs` || uniform), nats (at most ``max_kl``)."""
        return _kl_to_uniform(self.probs)

    def settings(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this estimator (``OnlineClusterer.prior_params``).

        >>> OnlinePrior(3, max_kl=0.2).settings()["max_kl"]
        0.2
        """
        return {name: getattr(self, name) for name in SETTINGS}

    def state(self) -> dict[str, Any]:
        """JSON-able state for a snapshot manifest (``version`` 2)."""
        return {
            "version": STATE_VERSION,
            "method": "soft-em",
            **self.settings(),
            "seen": self.seen,
            "counts": self.counts.tolist(),
        }

    @classmethod
    def from_state(cls, n_clusters: int, state: dict[str, Any]) -> OnlinePrior:
        """Inverse of :meth:`state`; raises ``ValueError`` for a state that does not fit K.

        A version-1 state (no ``version``: discounted counts of the regulariser's own labels)
        keeps its settings but not its counts: the estimate restarts, uniform until warm.
        """
        version = int(state.get("version", 1))
        if version not in (1, STATE_VERSION):
            raise ValueError(f"unknown prior state version {version}")
        defaults = cls(n_clusters)
        est = cls(
            n_clusters,
            decay=float(state.get("decay", defaults.decay)),
            alpha=float(state.get("alpha", defaults.alpha)),
            shrink=float(state.get("shrink", defaults.shrink)),
            max_kl=float(state.get("max_kl", defaults.max_kl)),
            warmup=int(state.get("warmup", defaults.warmup)),
        )
        counts = np.asarray(state.get("counts", np.zeros(n_clusters)), dtype=np.float64)
        if counts.shape != (n_clusters,) or not np.all(np.isfinite(counts)) or np.any(counts < 0):
            raise ValueError(f"prior counts must be {n_clusters} finite non-negative numbers")
        if version == 1:  # counts of CA's own labels: shaped by the prior, so start over
            return est
        est.counts = counts
        seen = state.get("seen")
        if not isinstance(seen, int) or seen < 0:
            raise ValueError(f"prior state 'seen' must be a non-negative integer, got {seen!r}")
        est.seen = seen
        return est


def resolve_prior(prior: Any, n_clusters: int) -> tuple[str, np.ndarray | None]:
    """Check a prior option and return ``(mode, vector)``.

    ``None`` or ``"uniform"`` -> ``("uniform", None)``; ``"online"`` -> ``("online", None)``; a
    length-K probability vector -> ``("fixed", vector)``. Raises ``ValueError`` otherwise.

    >>> resolve_prior("online", 3)
    ('online', None)
    >>> resolve_prior([0.5, 0.5], 2)[1].tolist()
    [0.5, 0.5]
    """
    if prior is None:
        return "uniform", None
    if isinstance(prior, str):
        if prior in ("uniform", "online"):
            return prior, None
        raise ValueError(
            f"prior must be 'uniform', 'online' or a probability vector, got {prior!r}"
        )
    try:
        p = np.asarray(prior, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"prior must be a vector of numbers, got {prior!r}") from None
    if p.shape != (n_clusters,):
        raise ValueError(
            f"prior must be a vector of length n_clusters={n_clusters}, got shape {p.shape}"
        )
    if not np.all(np.isfinite(p)) or np.any(p <= 0) or abs(p.sum() - 1.0) > 1e-6:
        raise ValueError("prior must be positive and sum to 1")
    return "fixed", p


def parse_prior(text: str | None) -> str | list[float] | None:
    """A prior as written on a command line or in ``OCLUST_PRIOR``.

    ``uniform`` and ``online`` stay names; ``0.5,0.3,0.2`` becomes a vector (checked later by
    :func:`resolve_prior` against K).

    >>> parse_prior("online"), parse_prior("0.5, 0.5"), parse_prior(None)
    ('online', [0.5, 0.5], None)
    """
    if text is None or text.strip() in ("", "uniform", "online"):
        return text.strip() or None if text is not None else None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(
            f"prior must be 'uniform', 'online' or comma-separated probabilities, got {text!r}"
        ) from None
