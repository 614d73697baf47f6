"""The other seeds' partition-support methods: CM / AE-CM, CKM, DRC and TCC (ARCHITECTURE.md §1.2).

All of them implement the one :class:`~oclust.model.regularisers.Regulariser` interface: they
receive a :class:`~oclust.model.regularisers.Batch` and return the batch's hard labels (the argmax
of their own assignment) and the loss. Their own parameters (a linear head, a decoder) are created
in :meth:`build` from the input shape and are trained and snapshotted with the rest of the model.

| name | paper | loss |
| --- | --- | --- |
| ``cm`` | Boubekki et al. 2021 | E1 + E2 + E3 + E4 (below) |
| ``aecm`` | Boubekki et al. 2021 | ``cm`` + beta * input reconstruction from z |
| ``ckm`` | Gao et al. 2020 | lam * E_s[D] / (2 sigma), s ~ Gumbel-softmax + beta * reconstruction |
| ``drc`` | Zhong et al. 2020 | AF contrast (tau 0.5) + AP contrast (tau 0.95) + 0.005 * CR |
| ``tcc`` | Shen et al. 2021 | cluster-level + instance-level contrast + KL(q marginal || prior) |

One method (family) a file: :mod:`oclust.model.seeds.cm` (CM, AE-CM), :mod:`oclust.model.seeds.ckm`,
:mod:`oclust.model.seeds.drc`, :mod:`oclust.model.seeds.tcc`. This package holds what they share
(Gumbel noise, InfoNCE, the decoder, the seeded random stream, the two augmented views) and
registers all of them when imported.

Example:
    >>> import torch
    >>> from oclust.model.regularisers import Batch, make_regulariser
    >>> reg = make_regulariser("cm")
    >>> reg.build((3,), latent_dim=4, n_clusters=2)
    >>> z = torch.randn(8, 4); mu = torch.randn(2, 4, requires_grad=True)
    >>> out = reg(Batch.build(torch.randn(8, 3), z, mu, 1.0, torch.log(torch.full((2,), 0.5))))
    >>> out.labels.shape, out.loss.dim()
    (torch.Size([8]), 0)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from oclust.model.augment import augment, kind_for_shape, seeded_generator
from oclust.model.regularisers import Batch, Regulariser

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


def _floats(module: nn.Module, **params: float) -> None:
    """Keep hyper-parameters as float attributes (a manifest read back from JSON may hold ints)."""
    for key, value in params.items():
        setattr(module, key, float(value))


class _Reconstructs(Regulariser):
    """Mixin of the autoencoder variants: an MLP decoder from the latent to the flattened input,
    made in :meth:`build` with ``hidden`` units, and the mean squared error of its output.
    """

    hidden: int

    def build(self, input_shape: tuple[int, ...], latent_dim: int, n_clusters: int) -> None:
        super().build(input_shape, latent_dim, n_clusters)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, self.hidden), nn.ReLU(),
            nn.Linear(self.hidden, math.prod(input_shape)),
        )

    def reconstruction(self, batch: Batch) -> torch.Tensor:
        """Mean squared error of the decoded latents against the (standardised) inputs."""
        return F.mse_loss(self.decoder(batch.z), batch.x.reshape(len(batch.x), -1))


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
        g = seeded_generator(int(self.rng_seed.item()), int(self.rng_step.item()), device)
        self.rng_step += 1
        return g


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


# The methods import the shared pieces above from this (partly initialised) package; importing
# them last registers them and re-exports their public names.
from oclust.model.seeds.ckm import ConcreteKMeans  # noqa: E402
from oclust.model.seeds.cm import (  # noqa: E402
    AutoencoderClusteringModule,
    ClusteringModule,
    CMTerms,
    cm_terms,
)
from oclust.model.seeds.drc import DeepRobustClustering, drc_contrast  # noqa: E402
from oclust.model.seeds.tcc import TwinContrastClustering  # noqa: E402
