"""Clustering module: CM and its autoencoder variant AE-CM (Boubekki et al. 2021).

The loss of ``cm``, with gamma = softmax(W z + c), centroids mu (K×m), bias b, N×m
latents and the orthonormality scale s² (the squared norm of a normalised latent, m by default;
the paper's s = 1 is for unnormalised latents)::

    E1 = sum_i ||z_i - (sum_k gamma_ik mu_k + b)||^2 / (N m)          reconstruction of z
    E2 = s^2 sum_ik gamma_ik (1 - gamma_ik) / (N m)                   Gini sparsity
    E3 = lam * sum_kl |mu mu^T / s^2 - I|_kl                           orthonormality (L1)
    E4 = sum_k (1 - alpha_k) log(mean_i gamma_ik)                      Dirichlet prior

With orthonormal centroids E1 + E2 equals the expected distance sum_ik gamma_ik ||z_i - mu_k - b||^2
/ (N m). alpha_k = 1 + (alpha - 1) K p_k spreads the concentration by the prior p (alpha_k = alpha
under a uniform prior). The paper's final "averaging epoch" becomes an exponential moving average
of the centroids (updated after each optimiser step). ``predict`` and ``/assign`` serve the
module's own rule, argmax_k gamma_ik; the reported distance is to that average (+ b).

Example:
    >>> import torch
    >>> from oclust.model.seeds.cm import cm_terms
    >>> t = cm_terms(torch.eye(2), torch.eye(2), torch.eye(2), torch.zeros(2),
    ...              torch.ones(2), 1.0, 1.0)
    >>> float(t.total())
    0.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oclust.model.regularisers import Batch, Output, Regulariser, register
from oclust.model.seeds import _EPS, _floats, _Reconstructs


@dataclass(frozen=True)
class CMTerms:
    """The four terms of the clustering-module loss (see the module docstring)."""

    reconstruction: torch.Tensor  # E1
    sparsity: torch.Tensor  # E2
    orthonormality: torch.Tensor  # E3
    dirichlet: torch.Tensor  # E4

    def total(self) -> torch.Tensor:
        """E1 + E2 + E3 + E4."""
        return self.reconstruction + self.sparsity + self.orthonormality + self.dirichlet


def cm_terms(
    z: torch.Tensor,
    gamma: torch.Tensor,
    mu: torch.Tensor,
    bias: torch.Tensor,
    alpha: torch.Tensor,
    lam: float,
    scale2: float,
) -> CMTerms:
    """The clustering-module loss terms for latents z (N×m), responsibilities gamma (N×K),
    centroids mu (K×m), reconstruction bias (m), Dirichlet concentrations alpha (K).

    >>> import torch
    >>> t = cm_terms(torch.eye(2), torch.eye(2), torch.eye(2), torch.zeros(2),
    ...              torch.ones(2), 1.0, 1.0)
    >>> float(t.total())
    0.0
    """
    n, m = z.shape
    rec = gamma @ mu + bias
    e1 = ((z - rec) ** 2).sum() / (n * m)
    e2 = scale2 * (gamma * (1.0 - gamma)).sum() / (n * m)
    eye = torch.eye(mu.shape[0], device=mu.device, dtype=mu.dtype)
    e3 = lam * (mu @ mu.T / scale2 - eye).abs().sum()
    e4 = ((1.0 - alpha) * torch.log(gamma.mean(0) + _EPS)).sum()
    return CMTerms(e1, e2, e3, e4)


@register
class ClusteringModule(Regulariser):
    """The clustering module (Boubekki et al. 2021) on the latents; see the module docstring.

    Args:
        alpha: Dirichlet concentration (> 1 pushes towards using every cluster).
        lam: weight of the orthonormality penalty (the authors' default 1).
        ema: decay of the moving average of the centroids that is served.
        scale2: s², the squared norm the centroids are made orthonormal at; 0 = latent_dim.
    """

    name = "cm"
    collapses_with_views = True  # 8×8 digits with views=True: one cluster

    def __init__(
        self, alpha: float = 2.0, lam: float = 1.0, ema: float = 0.95, scale2: float = 0.0
    ) -> None:
        super().__init__()
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        _floats(self, alpha=alpha, lam=lam, ema=ema, scale2=scale2)
        self.register_buffer("ema_centroids", torch.zeros(0))
        self.register_buffer("ema_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("head_ready", torch.zeros((), dtype=torch.bool))

    def build(self, input_shape: tuple[int, ...], latent_dim: int, n_clusters: int) -> None:
        self.head = nn.Linear(latent_dim, n_clusters)
        self.bias = nn.Parameter(torch.zeros(latent_dim))
        self.ema_centroids = torch.zeros(n_clusters, latent_dim)
        if self.scale2 <= 0:
            self.scale2 = float(latent_dim)

    def responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """gamma = softmax(W z + c), N×K."""
        return torch.softmax(self.head(z), dim=1)

    def concentrations(self, log_prior: torch.Tensor) -> torch.Tensor:
        """alpha_k = 1 + (alpha - 1) K p_k (alpha for every k under a uniform prior)."""
        p = log_prior.exp()
        return 1.0 + (self.alpha - 1.0) * p * p.numel() / p.sum()

    @torch.no_grad()
    def init_head(self, centroids: torch.Tensor, sigma: float, log_prior: torch.Tensor) -> None:
        """Start the linear map at the isotropic-GMM posterior of the current centroids.

        With W = mu / sigma and c = log p - ||mu||² / (2 sigma), softmax(W z + c) equals
        softmax(-||z - mu_k||² / (2 sigma) + log p_k) (the ||z||² term cancels): the module starts
        from the nearest-centroid soft assignment it is derived from, not from a random map
        unrelated to the centroids.
        """
        mu = centroids.detach().to(self.head.weight)
        self.head.weight.copy_(mu / sigma)
        self.head.bias.copy_(log_prior.to(mu) - (mu * mu).sum(1) / (2.0 * sigma))
        self.head_ready.fill_(True)

    def terms(self, batch: Batch) -> tuple[CMTerms, torch.Tensor]:
        """The loss terms and the responsibilities of a batch."""
        if not bool(self.head_ready):
            self.init_head(batch.centroids, batch.sigma, batch.log_prior)
        gamma = self.responsibilities(batch.z)
        alpha = self.concentrations(batch.log_prior.to(gamma))
        t = cm_terms(batch.z, gamma, batch.centroids, self.bias, alpha, self.lam, self.scale2)
        return t, gamma

    def forward(self, batch: Batch) -> Output:
        t, gamma = self.terms(batch)
        return Output(gamma.detach().argmax(dim=1), t.total())

    def serving_head(self) -> nn.Module:
        """The module's own rule is served: argmax gamma = argmax (W z + c)."""
        return self.head

    def after_step(self, centroids: torch.Tensor) -> None:
        c = centroids.detach().to(self.ema_centroids)
        if bool(self.ema_ready):
            self.ema_centroids.mul_(self.ema).add_(c, alpha=1.0 - self.ema)
        else:
            self.ema_centroids.copy_(c)
            self.ema_ready.fill_(True)

    def serving_centroids(self, centroids: torch.Tensor) -> torch.Tensor:
        """The moving average of the centroids, shifted by the reconstruction bias (the served
        distance is measured to these; the served label is argmax gamma)."""
        base = self.ema_centroids if bool(self.ema_ready) else centroids
        return base + self.bias.detach()


@register
class AutoencoderClusteringModule(_Reconstructs, ClusteringModule):
    """AE-CM: the clustering module plus beta times the reconstruction of the input from z.

    The decoder is an MLP from the latent to the flattened input.
    """

    name = "aecm"

    def __init__(self, alpha: float = 2.0, lam: float = 1.0, ema: float = 0.95,
                 scale2: float = 0.0, beta: float = 1.0, hidden: int = 512) -> None:
        super().__init__(alpha=alpha, lam=lam, ema=ema, scale2=scale2)
        self.beta = float(beta)
        self.hidden = int(hidden)

    def forward(self, batch: Batch) -> Output:
        t, gamma = self.terms(batch)
        loss = t.total() + self.beta * self.reconstruction(batch)
        return Output(gamma.detach().argmax(dim=1), loss)
