"""Concrete k-means, ``ckm`` (Gao et al. 2020).

Example:
    >>> import torch
    >>> from oclust.model.regularisers import Batch, make_regulariser
    >>> reg = make_regulariser("ckm"); reg.build((3,), latent_dim=4, n_clusters=2)
    >>> mu = torch.randn(2, 4, requires_grad=True)
    >>> out = reg(Batch.build(torch.randn(8, 3), torch.randn(8, 4), mu, 1.0, torch.zeros(2)))
    >>> out.labels.shape
    torch.Size([8])
"""

from __future__ import annotations

from oclust.model.regularisers import Batch, Output, register
from oclust.model.seeds import _floats, _Reconstructs, _Seeded, gumbel_softmax


@register
class ConcreteKMeans(_Reconstructs, _Seeded):
    """Concrete k-means (Gao et al. 2020): a k-means loss under Gumbel-softmax relaxed
    assignments, plus an autoencoder reconstruction that keeps the latents informative.

    loss = lam * mean_i sum_k s_ik D_ik / (2 sigma) + beta * ||x - g(z)||² / (N D), with
    s_i ~ Gumbel-softmax(-D_i / (2 sigma) + log p, tau); labels = argmax(-D / (2 sigma) + log p).
    """

    name = "ckm"
    collapses_with_views = True  # 8×8 digits with views=True: one cluster

    def __init__(
        self, lam: float = 0.1, beta: float = 1.0, tau: float = 0.5, hidden: int = 512
    ) -> None:
        super().__init__()
        _floats(self, lam=lam, beta=beta, tau=tau)
        self.hidden = int(hidden)

    def forward(self, batch: Batch) -> Output:
        scaled = batch.distances / (2.0 * batch.sigma)
        logits = -scaled + batch.log_prior.to(scaled)
        s = gumbel_softmax(logits, self.tau, self._generator(scaled.device))
        kmeans = (s * scaled).sum(1).mean()
        loss = self.lam * kmeans + self.beta * self.reconstruction(batch)
        return Output(logits.detach().argmax(dim=1), loss)
