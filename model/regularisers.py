"""Partition-support regularisers behind one interface (ARCHITECTURE.md §1.2).

A regulariser receives a :class:`Batch` (inputs, latents, centroids, the N×K squared distances,
sigma, the log prior and the encoder) and returns the batch's hard labels and the loss to
back-propagate. It is an ``nn.Module`` so methods with their own parameters (a decoder, a
linear head) are trained by the same optimiser and saved in the same snapshot.

New regularisers register by name with :func:`register`; :func:`make_regulariser` builds one
from a string.

What is *served* (``predict``, ``/assign``) is :func:`serve`: the nearest serving centroid, or,
for a method with its own assignment rule (the clustering module's gamma), the argmax of the
module that :meth:`Regulariser.serving_head` returns.

Example:
    >>> import torch
    >>> from oclust.model.regularisers import Batch, make_regulariser
    >>> z = torch.randn(8, 4); mu = torch.randn(3, 4, requires_grad=True)
    >>> batch = Batch.build(z, z, mu, sigma=1.0, log_prior=torch.full((3,), -1.0986))
    >>> out = make_regulariser("ca")(batch)
    >>> out.labels.shape, out.loss.requires_grad
    (torch.Size([8]), True)
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from oclust.model import REGULARISER_NAMES
from oclust.model.assign import combination_assignment

__all__ = [
    "REGULARISERS",
    "Batch",
    "Output",
    "Regulariser",
    "cluster_regularisation",
    "make_regulariser",
    "membership_variance",
    "pull",
    "register",
    "serve",
    "soft_assignment",
]

REGULARISERS: dict[str, type[Regulariser]] = {}


def register(cls: type[Regulariser]) -> type[Regulariser]:
    """Class decorator: make a regulariser selectable by its ``name``."""
    if cls.__module__.startswith("oclust.model.") and cls.name not in REGULARISER_NAMES:
        raise RuntimeError(f"built-in regulariser {cls.name!r} is missing from REGULARISER_NAMES")
    REGULARISERS[cls.name] = cls
    return cls


def soft_assignment(distances: torch.Tensor, sigma: float) -> torch.Tensor:
    """q_ik = softmax_k(-D_ik / (2 sigma)), the isotropic Gaussian responsibilities."""
    return torch.softmax(-distances / (2.0 * sigma), dim=1)


@dataclass
class Batch:
    """What every regulariser sees for one training step."""

    x: torch.Tensor  # inputs, already standardised, on the training device
    z: torch.Tensor  # latents f(x), N×m
    centroids: torch.Tensor  # K×m, trainable
    distances: torch.Tensor  # N×K squared Euclidean distances (with gradient)
    sigma: float
    log_prior: torch.Tensor  # K
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None  # f, for methods with views
    guide: torch.Tensor | None = None  # N×K extra assignment cost, no gradient (model.guide)

    @classmethod
    def build(
        cls,
        x: torch.Tensor,
        z: torch.Tensor,
        centroids: torch.Tensor,
        sigma: float,
        log_prior: torch.Tensor,
        encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Batch:
        """Compute the distance matrix and bundle everything."""
        return cls(x, z, centroids, sq_distances(z, centroids), sigma, log_prior, encode)

    def assign_costs(self) -> torch.Tensor:
        """The distances an assignment weighs (no gradient): ``distances``, plus the input
        guide's term while the model has one (:mod:`oclust.model.guide`; CA only)."""
        d = self.distances.detach()
        return d if self.guide is None else d + self.guide


@dataclass
class Output:
    """Hard labels (int64, N) and the scalar loss to back-propagate."""

    labels: torch.Tensor
    loss: torch.Tensor


def sq_distances(z: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances, N×K, non-negative."""
    d = (z * z).sum(1, keepdim=True) - 2.0 * z @ mu.T + (mu * mu).sum(1)[None, :]
    return d.clamp_min(0.0)


def serve(
    z: torch.Tensor, distances: torch.Tensor, sigma: float, head: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The served rule: (labels, squared distance to the label's centroid, assignment logits).

    Without a ``head``: the nearest centroid, logits -D / (2 sigma). With one (a method's own
    rule, e.g. the clustering module's gamma = softmax(W z + c)): labels = argmax head(z) and the
    logits are head(z); the distance is still the one to the chosen serving centroid. The soft
    assignment is softmax(logits). ``predict`` and the service both call this.

    >>> import torch
    >>> d = torch.tensor([[4.0, 1.0], [0.0, 9.0]])
    >>> serve(torch.zeros(2, 3), d, 1.0)[0].tolist()
    [1, 0]
    >>> head = torch.nn.Linear(3, 2); _ = torch.nn.init.zeros_(head.weight)
    >>> _ = head.bias.data.copy_(torch.tensor([0.0, 1.0]))
    >>> labels, dist, _ = serve(torch.zeros(2, 3), d, 1.0, head)
    >>> labels.tolist(), dist.tolist()
    ([1, 1], [1.0, 9.0])
    """
    if head is None:
        dist, labels = distances.min(dim=1)
        return labels, dist, distances * (-0.5 / sigma)
    logits = head(z)
    labels = logits.argmax(dim=1)
    return labels, distances.gather(1, labels[:, None])[:, 0], logits


def pull(distances: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean distance of each point to its assigned centroid: the loss all hard methods share."""
    return distances.gather(1, labels[:, None]).mean()


class Regulariser(nn.Module):
    """Base class: subclasses set ``name`` and implement :meth:`forward`."""

    name: ClassVar[str] = ""
    uses_views: ClassVar[bool] = False  # True for methods that need augmented views
    # True where the clusterer's per-input defaults were tuned with this method: sigma 50 on
    # windows and an augmented view for images (OnlineClusterer's sigma and views). CA only: on
    # the HAPT windows sigma 50 left sk, drc and ckm uneven, and on digits images views cost sk
    # NMI and made cm, ckm and aecm (losses on other scales) collapse
    tuned_defaults: ClassVar[bool] = False
    # True where training on augmented views (OnlineClusterer(views=True)) was measured to
    # collapse: the view's pull, a squared distance, outweighs a loss on another scale
    collapses_with_views: ClassVar[bool] = False

    def build(self, input_shape: tuple[int, ...], latent_dim: int, n_clusters: int) -> None:
        """Create parameters that depend on the data (a decoder, a head); default: none.

        Called once by the clusterer when the first batch fixes the input shape.
        """

    def forward(self, batch: Batch) -> Output:  # pragma: no cover - interface
        raise NotImplementedError

    def serving_centroids(self, centroids: torch.Tensor) -> torch.Tensor:
        """Centroids inference should use (e.g. a moving average); default: the trained ones."""
        return centroids

    def serving_head(self) -> nn.Module | None:
        """A module mapping latents to K assignment logits when the method has its own rule
        (argmax = served label, softmax = soft assignment); default ``None``: nearest centroid.
        """
        return None

    def after_step(self, centroids: torch.Tensor) -> None:
        """Hook run after each optimiser step (e.g. to update a moving average); default: none."""


@register
class NoRegulariser(Regulariser):
    """Plain nearest-centroid assignment; collapses. Kept as the control."""

    name = "none"

    def forward(self, batch: Batch) -> Output:
        labels = batch.distances.detach().argmin(dim=1)
        return Output(labels, pull(batch.distances, labels))


@register
class CombinationAssignment(Regulariser):
    """Combination assignment (Mahon & Lukasiewicz 2024), the default.

    Greedy hard assignment of the batch with cost D_ik + 2 sigma (log(n_k + 1) - log p_k);
    the loss is the mean distance to the assigned centroid (counts carry no gradient).
    """

    name = "ca"
    tuned_defaults = True

    def forward(self, batch: Batch) -> Output:
        # The greedy loop runs on the host in compiled code (one copy of the distances per
        # batch, made cluster-major: the kernel's layout, so it needs no transposing copy).
        labels = combination_assignment(
            batch.assign_costs(), 2.0 * batch.sigma, batch.log_prior.detach().cpu().numpy()
        )
        labels_t = torch.from_numpy(labels).to(batch.distances.device)
        return Output(labels_t, pull(batch.distances, labels_t))


def sinkhorn(logits: torch.Tensor, log_prior: torch.Tensor, n_iter: int) -> torch.Tensor:
    """Log-domain Sinkhorn-Knopp: rows sum to 1/N, columns to the prior (SwAV, Caron et al.)."""
    n = logits.shape[0]
    log_q = logits - logits.logsumexp(dim=(0, 1))
    for _ in range(n_iter):
        log_q = log_q - log_q.logsumexp(dim=0, keepdim=True) + log_prior[None, :]  # columns
        log_q = log_q - log_q.logsumexp(dim=1, keepdim=True) - math.log(n)  # rows
    return log_q.exp() * n


@register
class SinkhornKnopp(Regulariser):
    """Balanced soft assignment by Sinkhorn-Knopp; its argmax is the hard target (SwAV)."""

    name = "sk"

    def __init__(self, epsilon: float = 1.0, n_iter: int = 3) -> None:
        super().__init__()
        if not epsilon > 0 or n_iter < 1 or int(n_iter) != n_iter:  # epsilon 0: one cluster
            raise ValueError(f"sk needs epsilon > 0 and a whole n_iter >= 1, got epsilon="
                             f"{epsilon!r}, n_iter={n_iter!r}")
        self.epsilon = epsilon
        self.n_iter = int(n_iter)

    def forward(self, batch: Batch) -> Output:
        d = batch.distances.detach()
        logits = -d / (2.0 * batch.sigma * self.epsilon)
        q = sinkhorn(logits, batch.log_prior.to(d), self.n_iter)
        labels = q.argmax(dim=1)
        return Output(labels, pull(batch.distances, labels))


class PenalisedPull(Regulariser):
    """Nearest-centroid labels, and their pull loss plus ``lam * 2 sigma * penalty(batch)``.

    The shared form of ``ent``, ``ss`` and ``varm``: each defines only its penalty, a function of
    the whole batch that is smallest when the clusters are used evenly. lam is in units of 2 sigma
    (like the pull term), so it does not depend on the latent scale.
    """

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__()
        self.lam = lam

    def penalty(self, batch: Batch) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, batch: Batch) -> Output:
        labels = batch.distances.detach().argmin(dim=1)
        penalty = self.penalty(batch)
        loss = pull(batch.distances, labels) + self.lam * 2.0 * batch.sigma * penalty
        return Output(labels, loss)


@register
class EntropyRegulariser(PenalisedPull):
    """Nearest-centroid loss minus lambda times the entropy of the mean soft assignment (Li 2020).

    The penalty is minus the entropy of qbar, the batch mean of q = softmax(-D / (2 sigma)).
    """

    name = "ent"

    def penalty(self, batch: Batch) -> torch.Tensor:
        q_bar = soft_assignment(batch.distances, batch.sigma).mean(0)
        return (q_bar * (q_bar + 1e-12).log()).sum()  # -H(qbar)


@register
class SumOfSquares(PenalisedPull):
    """Nearest-centroid loss plus DRC's cluster regularisation (Zhong et al. 2020, eq. 9).

    CR = sum_k (sum_i q_ik)^2 / N with q = softmax(-D / (2 sigma)); it equals N * sum_k qbar_k^2
    and is smallest (N / K) when the mean soft assignment qbar is uniform. The loss is
    mean_i D_{i,k_i} + lam * 2 sigma * CR (lam in units of 2 sigma, like the pull term); the
    default lam is DRC's weight of CR, 0.005.

    >>> import torch
    >>> q = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    >>> float(cluster_regularisation(q))  # (1.5^2 + 0.5^2) / 2
    1.25
    """

    name = "ss"

    def __init__(self, lam: float = 0.005) -> None:
        super().__init__(lam)

    def penalty(self, batch: Batch) -> torch.Tensor:
        return cluster_regularisation(soft_assignment(batch.distances, batch.sigma))


def cluster_regularisation(q: torch.Tensor) -> torch.Tensor:
    """DRC eq. 9: sum_k (sum_i q_ik)^2 / N for soft assignments q (N×K)."""
    return (q.sum(0) ** 2).sum() / q.shape[0]


def membership_variance(distances: torch.Tensor, sigma: float) -> torch.Tensor:
    """Var_k of the batch mean of the un-normalised memberships s_ik = -D_ik / (2 sigma).

    s is the Gaussian log-membership before the softmax normalises it over clusters; unlike the
    normalised q (whose column sums always total N, so their variance is a rescaled
    sum_k (sum_i q_ik)^2), its cluster means are free, so this is not a rescaled ``ss``.

    >>> import torch
    >>> float(membership_variance(torch.tensor([[0.0, 2.0], [2.0, 6.0]]), 0.5))  # means -1, -4
    2.25
    """
    return (distances * (-0.5 / sigma)).mean(0).var(unbiased=False)


@register
class MarginalVariance(PenalisedPull):
    """Nearest-centroid loss plus lambda * 2 sigma * :func:`membership_variance`.

    The variance baseline of Mahon & Lukasiewicz 2024 (appendix C), in the form of the authors'
    released code: the variance over clusters of the batch-mean un-normalised membership (the
    distance term, before any softmax), which pulls every centroid to the same mean distance
    from the batch so that none is left without points.
    """

    name = "varm"

    def penalty(self, batch: Batch) -> torch.Tensor:
        return membership_variance(batch.distances, batch.sigma)


def make_regulariser(name: str, **params: float) -> Regulariser:
    """Build a registered regulariser by name, e.g. ``make_regulariser("sk", n_iter=3)``.

    ``ValueError`` for an unknown name or keyword, a NaN or infinite number, or something other
    than a number for a keyword whose default is one:

    >>> make_regulariser("ent", lam="x")
    Traceback (most recent call last):
    ...
    ValueError: bad reg_params for regulariser 'ent': lam='x' is not a finite number
    """
    try:
        cls = REGULARISERS[name]
    except KeyError:
        raise ValueError(
            f"unknown regulariser {name!r}; choose from {', '.join(sorted(REGULARISERS))}"
        ) from None
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    for key, value in params.items():  # NaN or inf trained on to a FloatingPointError, a
        number = _is_number(value)  # string to a TypeError mid-step
        if (_is_number(defaults.get(key)) and not number) or (number and not math.isfinite(value)):
            raise ValueError(f"bad reg_params for regulariser {name!r}: {key}={value!r} is not "
                             "a finite number")
    try:
        return cls(**params)
    except TypeError as exc:  # an unknown or missing keyword: a bad reg_params, not a bug
        raise ValueError(f"bad reg_params for regulariser {name!r}: {exc}") from None


def _is_number(value: object) -> bool:
    """A real number, not a bool: a keyword whose default is one takes only numbers."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# the methods of model.seeds register themselves; importing them here (last, once every name
# above exists) makes the registry complete whichever module is imported first
from oclust.model import seeds as _seeds  # noqa: E402, F401
