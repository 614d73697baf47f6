"""The input guide: for a model's first steps, CA also weighs where each input lies in input space.

A fresh encoder's latent space is a poorer place to find a partition than the standardised
inputs on some data (ImageSegments: the partition a run ends with is set in its first epoch, and
k-means of the fresh latents finds a worse one than k-means of the inputs), a better one on
others (flat FashionMNIST). Seeding in input space commits to the input partition for good; the
guide only leans on it, and less with every step. For the first ``steps`` training steps the
assignment cost of sample i to cluster k gains

    beta_t * s2 * ||x_i - nu_k||^2,    beta_t = 1 - t / steps,

where x are the standardised inputs (flattened), nu_k the mean input of cluster k (seeded from
the first batch's partition, then an exponential moving average of the inputs each step assigns
to k), and s2 scales the inputs' spread to the latents' (``weight`` times the ratio of their
mean squared distances to the batch mean, fixed at the first batch). The term carries no
gradient and the loss is unchanged: it moves only which cluster a sample is pulled to. Served
labels never see it.

Example:
    >>> import torch
    >>> from oclust.model.guide import InputGuide
    >>> x = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    >>> z = torch.tensor([[0.0, 0.0], [0.0, 0.1], [1.0, 1.0], [1.0, 1.1]])
    >>> g = InputGuide(steps=10)
    >>> g.start(x, z, torch.tensor([0, 0, 1, 1]), n_clusters=2)
    >>> g.costs(x, step=0).argmin(1).tolist()  # each input is nearest its own cluster's mean
    [0, 0, 1, 1]
    >>> g.costs(x, step=10) is None  # blended out
    True
"""

from __future__ import annotations

import math

import torch

from oclust.model.regularisers import sq_distances

__all__ = ["RATE", "STEPS", "WEIGHT", "InputGuide"]

STEPS = 200  # the default's guided steps (MLP encoder with CA; tuned on digits and ImageSegments)
WEIGHT = 2.0  # the inputs' spread against the latents', at the first step
RATE = 0.1  # moving-average rate of each cluster's mean input


def _spread(a: torch.Tensor) -> float:
    """Mean squared distance of the rows to their mean."""
    return float(((a - a.mean(0)) ** 2).sum(1).mean())


class InputGuide:
    """The input-space term of CA's assignment cost over a model's first ``steps`` steps.

    :meth:`start` at the first batch (the seeded partition), :meth:`costs` before each step's
    assignment, :meth:`update` after it; :meth:`state` and :meth:`load` for snapshots.
    """

    def __init__(self, steps: int, weight: float = WEIGHT, rate: float = RATE) -> None:
        self.steps = steps
        self.weight = weight
        self.rate = rate
        self.means: torch.Tensor | None = None  # K x D mean inputs
        self.scale = 0.0  # s2

    def start(self, x: torch.Tensor, z: torch.Tensor, labels: torch.Tensor,
              n_clusters: int) -> None:
        """Seed the mean inputs from the first batch ``x`` (standardised) and its seeded labels,
        and the scale from its latents ``z``; a cluster the seeding left empty starts at the
        batch's mean. A batch whose inputs do not spread (one row) leaves the scale 0:
        :attr:`started` stays False, and the model starts it again on a later batch."""
        flat = x.detach().reshape(len(x), -1)
        spread = _spread(flat)  # 0 for one row, or identical ones: nothing to scale by yet
        self.scale = self.weight * _spread(z.detach()) / spread if spread > 1e-12 else 0.0
        means = flat.mean(0).repeat(n_clusters, 1)
        for k in range(n_clusters):
            mine = labels == k
            if mine.any():
                means[k] = flat[mine].mean(0)
        self.means = means

    @property
    def started(self) -> bool:
        """Seeded from a batch whose inputs spread (until then the term is 0)."""
        return self.means is not None and self.scale > 0

    def costs(self, x: torch.Tensor, step: int) -> torch.Tensor | None:
        """The N x K term to add to the assignment cost at ``step``; None once blended out (or
        before :meth:`start`)."""
        beta = 1.0 - step / self.steps if self.steps else 0.0
        if beta <= 0 or self.means is None:
            return None
        return sq_distances(x.detach().reshape(len(x), -1), self.means) * (beta * self.scale)

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Move each cluster's mean input toward the mean of the inputs ``labels`` gave it."""
        if self.means is None:
            return
        flat = x.detach().reshape(len(x), -1)
        for k in labels.unique().tolist():
            self.means[k] = (1 - self.rate) * self.means[k] + self.rate * flat[labels == k].mean(0)

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors a snapshot keeps (none before :meth:`start`)."""
        if self.means is None:
            return {}
        return {"means": self.means, "scale": torch.tensor(self.scale, dtype=torch.float64)}

    def load(self, state: dict[str, torch.Tensor], shape: tuple[int, int],
             device: torch.device) -> None:
        """Put :meth:`state`'s tensors back; ``shape`` is (K, input size). An empty state
        leaves the guide unstarted; ``ValueError`` for tensors that do not fit."""
        if not state:
            return
        found = {k: (tuple(v.shape), str(v.dtype)) for k, v in state.items()}
        if set(state) != {"means", "scale"}:
            raise ValueError(f"input guide tensors {found}: expected 'means' and 'scale'")
        means, scale = state["means"], state["scale"]
        if tuple(means.shape) != shape or scale.numel() != 1 or not (
            means.is_floating_point() and scale.is_floating_point()
        ) or not 0 <= float(scale) < math.inf:
            raise ValueError(f"input guide tensors {found} do not fit: means of shape {shape} "
                             "and one finite scale >= 0, both floating point")
        self.means = means.to(device=device, dtype=torch.float32).clone()
        self.scale = float(scale)
