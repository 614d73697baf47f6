"""The other seeds' partition-support methods: CM / AE-CM, CKM, DRC and TCC (ARCHITECTURE.md §1.2).

All of them implement the one :class:`~model.regularisers.Regulariser` interface: they receive a
:class:`~model.regularisers.Batch` and return the batch's hard labels (the argmax of their own
assignment) and the loss. Their own parameters (a linear head, a decoder) are created in
:meth:`build` from the input shape and are trained and snapshotted with the rest of the model.

| name | paper | loss |
| --- | --- | --- |
| ``cm`` | Boubekki et al. 2021 | E1 + E2 + E3 + E4 (below) |
| ``aecm`` | Boubekki et al. 2021 | ``cm`` + beta * input reconstruction from z |
| ``ckm`` | Gao et al. 2020 | lam * E_s[D] / (2 sigma), s ~ Gumbel-softmax + beta * reconstruction |
| ``drc`` | Zhong et al. 2020 | AF contrast (tau 0.5) + AP contrast (tau 0.95) + 0.005 * CR |
| ``tcc`` | Shen et al. 2021 | cluster-level + instance-level contrast + KL(q marginal || prior) |

Clustering module (``cm``), with gamma = softmax(W z + c), centroids mu (K×m), bias b, N×m
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
    >>> from model.regularisers import Batch, make_regulariser
    >>> reg = make_regulariser("cm")
    >>> reg.build((3,), latent_dim=4, n_clusters=2)
    >>> z = torch.randn(8, 4); mu = torch.randn(2, 4, requires_grad=True)
    >>> out = reg(Batch.build(torch.randn(8, 3), z, mu, 1.0, torch.log(torch.full((2,), 0.5))))
    >>> out.labels.shape, out.loss.dim()
    (torch.Size([8]), 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.augment import augment, kind_for_shape
from model.regularisers import Batch, Output, Regulariser, register, sq_distances

__all__ = [
    "AutoencoderClusteringModule",
    "CMTerms",
    "ClusteringModule",
    "ConcreteKMeans",
    "DeepRobustClustering",
    "TwinContrastClustering",
    "cm_terms",
    "drc_contrast",
    "gumbel_softmax",
    "nt_xent",
]

_EPS = 1e-10


# --------------------------------------------------------------------------- shared pieces
def gumbel_softmax(logits: torch.Tensor, tau: float, g: torch.Generator) -> torch.Tensor:
    """Relaxed one-hot samples softmax((logits + Gumbel noise) / tau), drawn from ``g``.

    >>> import torch
    >>> s = gumbel_softmax(torch.zeros(4, 3), 0.5, torch.Generator().manual_seed(0))
    >>> torch.allclose(s.sum(1), torch.ones(4))
    True
    """
    u = torch.rand(logits.shape, generator=g, device=g.device).to(logits)
    gumbel = -torch.log(-torch.log(u.clamp(_EPS, 1.0 - 1e-7)))
    return torch.softmax((logits + gumbel) / tau, dim=1)


def nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE (NT-Xent): row i of ``a`` and row i of ``b`` are positives, the other
    2M - 2 rows negatives; cosine similarity over temperature ``tau``.

    >>> import torch
    >>> a = torch.eye(3)
    >>> bool(nt_xent(a, a, 0.1) < nt_xent(a, a.roll(1, 0), 0.1))
    True
    """
    m = a.shape[0]
    reps = F.normalize(torch.cat([a, b]), dim=1, eps=1e-8)
    sim = reps @ reps.T / tau
    self_mask = torch.eye(2 * m, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    idx = torch.arange(m, device=sim.device)
    return F.cross_entropy(sim, torch.cat([idx + m, idx]))


def _decoder(latent_dim: int, input_shape: tuple[int, ...], hidden: int) -> nn.Module:
    """An MLP from the latent to the flattened input, for the autoencoder variants."""
    return nn.Sequential(
        nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, math.prod(input_shape))
    )


def _reconstruction(decoder: nn.Module, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the decoded latents against the (standardised) inputs."""
    return F.mse_loss(decoder(z), x.reshape(len(x), -1))


class _Seeded(Regulariser):
    """A regulariser that draws random numbers (views, Gumbel noise) from its own seeded stream.

    The seed is drawn in :meth:`build` (under the clusterer's seed) and the stream position is a
    step counter; both are buffers, so a snapshot continues with the same random numbers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rng_seed", torch.zeros((), dtype=torch.int64))
        self.register_buffer("rng_step", torch.zeros((), dtype=torch.int64))

    def build(self, input_shape: tuple[int, ...], latent_dim: int, n_clusters: int) -> None:
        self.rng_seed.fill_(int(torch.randint(0, 2**31 - 1, ()).item()))

    def _generator(self, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(int(self.rng_seed.item()) * 1_000_003 + int(self.rng_step.item()))
        self.rng_step += 1
        return g


# --------------------------------------------------------------------------- CM / AE-CM
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

    def __init__(
        self, alpha: float = 2.0, lam: float = 1.0, ema: float = 0.95, scale2: float = 0.0
    ) -> None:
        super().__init__()
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        self.alpha = float(alpha)
        self.lam = float(lam)
        self.ema = float(ema)
        self.scale2 = float(scale2)
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
class AutoencoderClusteringModule(ClusteringModule):
    """AE-CM: the clustering module plus beta times the reconstruction of the input from z.

    The decoder is an MLP from the latent to the flattened input.
    """

    name = "aecm"

    def __init__(
        self,
        alpha: float = 2.0,
        lam: float = 1.0,
        ema: float = 0.95,
        scale2: float = 0.0,
        beta: float = 1.0,
        hidden: int = 512,
    ) -> None:
        super().__init__(alpha=alpha, lam=lam, ema=ema, scale2=scale2)
        self.beta = float(beta)
        self.hidden = int(hidden)

    def build(self, input_shape: tuple[int, ...], latent_dim: int, n_clusters: int) -> None:
        super().build(input_shape, latent_dim, n_clusters)
        self.decoder = _decoder(latent_dim, input_shape, self.hidden)

    def forward(self, batch: Batch) -> Output:
        t, gamma = self.terms(batch)
        loss = t.total() + self.beta * _reconstruction(self.decoder, batch.z, batch.x)
        return Output(gamma.detach().argmax(dim=1), loss)


# --------------------------------------------------------------------------- CKM
@register
class ConcreteKMeans(_Seeded):
    """Concrete k-means (Gao et al. 2020): a k-means loss under Gumbel-softmax relaxed
    assignments, plus an autoencoder reconstruction that keeps the latents informative.

    loss = lam * mean_i sum_k s_ik D_ik / (2 sigma) + beta * ||x - g(z)||² / (N D), with
    s_i ~ Gumbel-softmax(-D_i / (2 sigma) + log p, tau); labels = argmax(-D / (2 sigma) + log p).
    """

    name = "ckm"

    def __init__(
        self, lam: float = 0.1, beta: float = 1.0, tau: float = 0.5, hidden: int = 512
    ) -> None:
        super().__init__()
        self.lam = float(lam)
        self.beta = float(beta)
        self.tau = float(tau)
        self.hidden = int(hidden)

    def build(self, input_shape: tuple[int, ...], latent_dim: int, n_clusters: int) -> None:
        super().build(input_shape, latent_dim, n_clusters)
        self.decoder = _decoder(latent_dim, input_shape, self.hidden)

    def forward(self, batch: Batch) -> Output:
        scaled = batch.distances / (2.0 * batch.sigma)
        logits = -scaled + batch.log_prior.to(scaled)
        s = gumbel_softmax(logits, self.tau, self._generator(scaled.device))
        kmeans = (s * scaled).sum(1).mean()
        loss = self.lam * kmeans + self.beta * _reconstruction(self.decoder, batch.z, batch.x)
        return Output(logits.detach().argmax(dim=1), loss)


# --------------------------------------------------------------------------- view methods
class _Views(_Seeded):
    """Base for the contrastive methods: two augmented views of the batch, encoded by f."""

    uses_views = True

    def build(self, input_shape: tuple[int, ...], latent_dim: int, n_clusters: int) -> None:
        super().build(input_shape, latent_dim, n_clusters)
        self.view_kind = kind_for_shape(input_shape)

    def _views(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        if batch.encode is None:
            raise ValueError(f"{self.name} needs the encoder in the batch (Batch.encode)")
        g = self._generator(batch.x.device)
        kind = getattr(self, "view_kind", "auto")
        z1 = batch.encode(augment(batch.x, g, kind))
        z2 = batch.encode(augment(batch.x, g, kind))
        return z1, z2, g


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
        self.tau_af = float(tau_af)
        self.tau_ap = float(tau_ap)
        self.lam = float(lam)
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

    def __init__(
        self,
        tau_instance: float = 0.5,
        tau_cluster: float = 1.0,
        gumbel_tau: float = 1.0,
        lam: float = 1.0,
    ) -> None:
        super().__init__()
        self.tau_instance = float(tau_instance)
        self.tau_cluster = float(tau_cluster)
        self.gumbel_tau = float(gumbel_tau)
        self.lam = float(lam)

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
