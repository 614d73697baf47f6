"""Cluster priors for imbalanced streams: uniform, a fixed vector, or estimated online.

The prior p over the K clusters enters the regularisers as ``log_prior`` (CA trades
``2 sigma (log(n_k + 1) - log p_k)`` against distance, so a non-uniform prior lets an imbalanced
stream keep imbalanced clusters). When the class frequencies are unknown, :class:`OnlinePrior`
estimates them from the stream: an exponential moving average of the hard label counts of each
batch, with Dirichlet smoothing,

    m_k <- decay * m_k + n_k(batch)            p_k = (m_k + alpha) / (sum_j m_j + K alpha)

which is the posterior mean of the cluster frequencies under a symmetric Dirichlet(alpha) prior
given the discounted counts (an effective window of about ``batch / (1 - decay)`` samples). The
estimate is fed back to the regulariser as ``log_prior`` after every step and stored in the
snapshot manifest. A floor (``min_share / K``) keeps a cluster that momentarily empties from
being priced out for good (with CA, a tiny p_k makes cluster k ever harder to join).

Example:
    >>> import numpy as np
    >>> from model.priors import OnlinePrior
    >>> est = OnlinePrior(3, decay=0.9)
    >>> rng = np.random.default_rng(0)
    >>> for _ in range(200):
    ...     _ = est.update(rng.choice(3, size=256, p=[0.6, 0.3, 0.1]))
    >>> np.round(est.probs, 1).tolist()
    [0.6, 0.3, 0.1]
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["OnlinePrior", "parse_prior", "resolve_prior"]


class OnlinePrior:
    """Online estimate of the cluster frequencies (EMA of counts, Dirichlet smoothing).

    Args:
        n_clusters: K.
        decay: per-batch discount of the past counts, in [0, 1).
        alpha: symmetric Dirichlet concentration (pseudo-count per cluster), > 0.
        min_share: floor on each p_k as a share of the uniform 1/K, in [0, 1).
    """

    def __init__(
        self, n_clusters: int, decay: float = 0.95, alpha: float = 1.0, min_share: float = 0.1
    ) -> None:
        if not isinstance(n_clusters, int) or n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive integer, got {n_clusters!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        if not 0.0 <= min_share < 1.0:
            raise ValueError(f"min_share must be in [0, 1), got {min_share!r}")
        self.n_clusters = n_clusters
        self.decay = decay
        self.alpha = alpha
        self.min_share = min_share
        self.counts = np.zeros(n_clusters, dtype=np.float64)

    def update(self, labels: np.ndarray) -> np.ndarray:
        """Fold one batch of hard labels into the estimate; returns the new :attr:`probs`."""
        lab = np.asarray(labels).reshape(-1)
        if lab.size and (lab.min() < 0 or lab.max() >= self.n_clusters):
            raise ValueError(f"labels must lie in [0, {self.n_clusters}), got {lab.min()}..")
        hist = np.bincount(lab.astype(np.int64), minlength=self.n_clusters).astype(np.float64)
        self.counts = self.decay * self.counts + hist
        return self.probs

    @property
    def probs(self) -> np.ndarray:
        """The current estimate: positive, sums to one (uniform before any update)."""
        k = self.n_clusters
        p = (self.counts + self.alpha) / (self.counts.sum() + k * self.alpha)
        floor = self.min_share / k
        p = np.maximum(p, floor)
        return p / p.sum()

    def state(self) -> dict[str, Any]:
        """JSON-able state for a snapshot manifest."""
        return {
            "decay": self.decay,
            "alpha": self.alpha,
            "min_share": self.min_share,
            "counts": self.counts.tolist(),
        }

    @classmethod
    def from_state(cls, n_clusters: int, state: dict[str, Any]) -> OnlinePrior:
        """Inverse of :meth:`state`; raises ``ValueError`` for a state that does not fit K."""
        est = cls(
            n_clusters,
            decay=float(state.get("decay", 0.95)),
            alpha=float(state.get("alpha", 1.0)),
            min_share=float(state.get("min_share", 0.1)),
        )
        counts = np.asarray(state.get("counts", np.zeros(n_clusters)), dtype=np.float64)
        if counts.shape != (n_clusters,) or not np.all(np.isfinite(counts)) or np.any(counts < 0):
            raise ValueError(f"prior counts must be {n_clusters} finite non-negative numbers")
        est.counts = counts
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
