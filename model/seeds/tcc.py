"""Twin-contrast clustering, ``tcc`` (Shen et al. 2021): cluster- and instance-level contrast.

Example:
    >>> from oclust.model.regularisers import REGULARISERS
    >>> REGULARISERS["tcc"].uses_views
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oclust.model.regularisers import Batch, Output, register, sq_distances
from oclust.model.seeds import _EPS, _floats, _Views, gumbel_softmax, nt_xent


@register
class TwinContrastClustering(_Views):
    """Twin-contrast clustering (Shen et al. 2021) on two augmented views.

    q(k|x) = softmax(-D / (2 sigma)); pi_i ~ Gumbel-softmax(log q(.|x_i), ``gumbel_tau``);
    cluster representations r_k = L2norm(sum_i pi_ik h_i) with h = L2norm(f(x)), contrasted
    across the views (InfoNCE over clusters, ``tau_cluster``), an instance-level InfoNCE of h
    across views (``tau_instance``), and ``lam`` * KL(mean_i q(.|x_i) || p): the ELBO's
    KL(q(k|x) || p(k)) taken on the batch marginal (the per-sample form would also penalise
    confident assignments; the marginal form is the part that prevents collapse).
    Labels: nearest centroid of the clean batch.

    Deviation: the paper's instance term is the ELBO's E_{k ~ q(k|x)} of a contrast conditioned
    on the sampled cluster k; here it is the unconditioned InfoNCE of h across the views. The
    encoder has no cluster-conditioned projection to contrast, and the cluster term already
    carries the dependence on the sampled assignments pi.
    """

    name = "tcc"

    def __init__(self, tau_instance: float = 0.5, tau_cluster: float = 1.0,
                 gumbel_tau: float = 1.0, lam: float = 1.0) -> None:
        super().__init__()
        _floats(self, tau_instance=tau_instance, tau_cluster=tau_cluster, gumbel_tau=gumbel_tau,
                lam=lam)

    def forward(self, batch: Batch) -> Output:
        z1, z2, g = self._views(batch)
        h1, h2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        logq1 = torch.log_softmax(-sq_distances(z1, batch.centroids) / (2.0 * batch.sigma), 1)
        logq2 = torch.log_softmax(-sq_distances(z2, batch.centroids) / (2.0 * batch.sigma), 1)
        pi1 = gumbel_softmax(logq1, self.gumbel_tau, g)
        pi2 = gumbel_softmax(logq2, self.gumbel_tau, g)
        r1 = F.normalize(pi1.T @ h1, dim=1, eps=1e-8)
        r2 = F.normalize(pi2.T @ h2, dim=1, eps=1e-8)
        clu = nt_xent(r1, r2, self.tau_cluster)
        ins = nt_xent(h1, h2, self.tau_instance)
        q_bar = 0.5 * (logq1.exp().mean(0) + logq2.exp().mean(0))
        log_p = batch.log_prior.to(q_bar)
        kl = (q_bar * (torch.log(q_bar + _EPS) - log_p)).sum()
        loss = clu + ins + self.lam * kl
        return Output(batch.distances.detach().argmin(dim=1), loss)
