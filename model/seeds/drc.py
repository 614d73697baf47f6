"""Deep Robust Clustering, ``drc`` (Zhong et al. 2020): contrast of two augmented views.

Example:
    >>> import torch
    >>> from oclust.model.seeds.drc import drc_contrast
    >>> bool(drc_contrast(torch.eye(3), torch.eye(3), 0.5) >= 0)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oclust.model.regularisers import Batch, Output, register, sq_distances
from oclust.model.seeds import _floats, _Views, nt_xent


def drc_contrast(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """DRC's contrastive loss (Zhong et al. 2020, eq. 5): row i of ``a`` against every row of
    ``b``, the positive b_i among the M rows of the other view (no same-view negatives, one
    direction), cosine similarity over ``tau``:

        L = -1/M sum_i log( exp(s(a_i, b_i) / tau) / sum_j exp(s(a_i, b_j) / tau) )

    >>> import math, torch
    >>> a = torch.eye(2)  # s = identity: -log(e / (e + 1)) = log(1 + 1/e)
    >>> round(float(drc_contrast(a, a, 1.0)), 6) == round(math.log(1 + math.exp(-1)), 6)
    True
    """
    sim = F.normalize(a, dim=1, eps=1e-8) @ F.normalize(b, dim=1, eps=1e-8).T / tau
    return F.cross_entropy(sim, torch.arange(a.shape[0], device=sim.device))


@register
class DeepRobustClustering(_Views):
    """Deep Robust Clustering (Zhong et al. 2020) on two augmented views.

    For each view the assignment features (AF) are the K-dimensional logits -D / (2 sigma) and
    the assignment probabilities P = softmax(AF) (the centroids are the cluster head).
    AF loss: :func:`drc_contrast` of the AF rows across the views, temperature ``tau_af``
    (eq. 5); AP loss: the same on the columns of P (one N-vector per cluster), ``tau_ap``;
    CR: sum_k (sum_i p_ik)^2 / N (eq. 9), weighted by 1 / (K p_k) so that a non-uniform prior
    moves its minimum to the prior (weights are 1 under a uniform prior: the paper's term).
    ``contrast="ntxent"`` swaps both contrastive terms for the symmetric NT-Xent (SimCLR) form
    with 2M - 2 negatives. Labels: nearest centroid of the clean batch.
    """

    name = "drc"

    def __init__(
        self, tau_af: float = 0.5, tau_ap: float = 0.95, lam: float = 0.005,
        contrast: str = "paper",
    ) -> None:
        super().__init__()
        if contrast not in ("paper", "ntxent"):
            raise ValueError(f"contrast must be 'paper' or 'ntxent', got {contrast!r}")
        _floats(self, tau_af=tau_af, tau_ap=tau_ap, lam=lam)
        self.contrast = contrast

    def forward(self, batch: Batch) -> Output:
        z1, z2, _ = self._views(batch)
        af1 = -sq_distances(z1, batch.centroids) / (2.0 * batch.sigma)
        af2 = -sq_distances(z2, batch.centroids) / (2.0 * batch.sigma)
        p1, p2 = torch.softmax(af1, dim=1), torch.softmax(af2, dim=1)
        contrast = drc_contrast if self.contrast == "paper" else nt_xent
        af = contrast(af1, af2, self.tau_af)
        ap = contrast(p1.T, p2.T, self.tau_ap)
        prior = batch.log_prior.to(p1).exp()
        weight = 1.0 / (prior * prior.numel())
        cr = sum(((p.sum(0) ** 2) * weight).sum() / p.shape[0] for p in (p1, p2)) / 2.0
        loss = af + ap + self.lam * cr
        return Output(batch.distances.detach().argmin(dim=1), loss)
