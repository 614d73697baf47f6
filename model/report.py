"""What one training step did: :class:`StepReport`, returned as ``last_step_`` by ``partial_fit``.

Example:
    >>> import numpy as np
    >>> from oclust.model.report import StepReport
    >>> r = StepReport.build(np.array([0, 1]), np.array([0, 0]), 0.5, np.array([0.5, 0.5]))
    >>> round(r.train_hard_entropy, 3), abs(r.served_hard_entropy), r.n
    (0.693, 0.0, 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oclust.model import metrics

__all__ = ["StepReport"]


@dataclass(frozen=True)
class StepReport:
    """What one ``partial_fit`` step did, by the training labels and by the served labels.

    The *training* labels are the regulariser's assignment of the batch (CA and SK balance them
    by construction, even for a collapsed encoder). The *served* labels are the nearest
    (serving) centroid of each sample, the rule ``predict`` and ``/assign`` use, computed from
    the step's own latents (no second forward pass; an encoder with batch normalisation takes
    one inference-mode pass without gradients, as ``predict`` does): collapse shows there
    first. Entropies and KL* are in nats.
    """

    labels: np.ndarray  # hard training labels of the batch (from the regulariser)
    loss: float  # what the step back-propagated (with views: the mean with the view's pull)
    train_hard_entropy: float  # entropy of the training-label histogram (max log K)
    train_kl_star: float  # KL(training-label histogram || prior)
    n: int
    served_labels: np.ndarray  # nearest serving centroid of each sample (what predict says)
    served_hard_entropy: float  # entropy of the served-label histogram
    served_kl_star: float  # KL(served-label histogram || prior)

    @classmethod
    def build(
        cls, labels: np.ndarray, served: np.ndarray, loss: float, prior: np.ndarray
    ) -> StepReport:
        """The report of a step from its training and served labels (int64), loss and the
        length-K prior the histograms are compared with."""
        k = len(prior)
        hist = metrics.cluster_distribution(labels, k)
        served_hist = metrics.cluster_distribution(served, k)
        return cls(
            labels=labels,
            loss=loss,
            train_hard_entropy=metrics.entropy(hist),
            train_kl_star=metrics.kl_star(hist, prior),
            n=len(labels),
            served_labels=served,
            served_hard_entropy=metrics.entropy(served_hist),
            served_kl_star=metrics.kl_star(served_hist, prior),
        )
