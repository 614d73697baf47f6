"""Every regulariser honours the interface: labels, a loss with gradients to f and mu."""

import math

import numpy as np
import pytest
import torch

from oclust.model import OnlineClusterer, metrics
from oclust.model.regularisers import (
    REGULARISERS,
    Batch,
    cluster_regularisation,
    make_regulariser,
    membership_variance,
    soft_assignment,
)

BASIC = ["ca", "sk", "ent", "ss", "varm", "none"]


def _batch(n: int = 32, k: int = 4, m: int = 5) -> tuple[Batch, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    enc = torch.nn.Linear(3, m)
    x = torch.randn(n, 3)
    mu = torch.randn(k, m, requires_grad=True)
    z = enc(x)
    return Batch.build(x, z, mu, 1.0, torch.full((k,), -math.log(k)), enc), enc, mu


@pytest.mark.parametrize("name", BASIC)
def test_interface_shapes_and_gradients(name):
    batch, enc, mu = _batch()
    out = make_regulariser(name)(batch)
    assert out.labels.shape == (32,) and out.labels.dtype == torch.int64
    assert int(out.labels.min()) >= 0 and int(out.labels.max()) < 4
    assert out.loss.dim() == 0
    out.loss.backward()
    assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0
    assert mu.grad is not None and mu.grad.abs().sum() > 0


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown regulariser"):
        make_regulariser("nope")


def _mixture(seed: int = 0, n: int = 1200, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(k, 6))
    y = rng.integers(k, size=n)
    return (centres[y] + rng.normal(size=(n, 6))).astype(np.float32), y


@pytest.mark.parametrize("name", [n for n in BASIC if n != "none"])
def test_short_run_on_gaussian_mixture_does_not_collapse(name):
    X, _ = _mixture()
    clf = OnlineClusterer(4, name, latent_dim=16, seed=0, hidden=(32,))
    clf.fit(X, epochs=4, batch_size=128)
    pred = clf.predict(X)
    assert metrics.hard_entropy(pred, 4) > 0.75 * math.log(4), name


@pytest.mark.parametrize(("hidden_norm", "none_below"), [("none", 0.6), ("batch", 0.85)])
def test_none_loses_the_partition_that_ca_keeps(hidden_norm: str, none_below: float):
    # Structureless data: nothing but the regulariser keeps the partition alive. Without the
    # MLP's hidden BatchNorm none collapses (0.49 of log 4); with it, it only loses a cluster
    # (0.77, 3 of 4 clusters used) in these 10 epochs.
    X = np.random.default_rng(0).normal(size=(1200, 6)).astype(np.float32)
    ratio = {}
    for name in ("none", "ca"):
        clf = OnlineClusterer(4, name, latent_dim=16, seed=0, hidden=(32,), lr=1e-2,
                              hidden_norm=hidden_norm)
        clf.fit(X, epochs=10, batch_size=128)
        ratio[name] = metrics.hard_entropy(clf.predict(X), 4) / math.log(4)
    assert ratio["none"] < none_below
    assert ratio["ca"] > 0.95


def test_registry_lists_the_basic_methods():
    assert set(BASIC) <= set(REGULARISERS)


# --------------------------------------------------------------------------- equations pinned
def _given(distances: list[list[float]], sigma: float) -> Batch:
    """A batch with the N×K distances given directly (latents unused by ss/varm)."""
    d = torch.tensor(distances, requires_grad=True)
    n, k = d.shape
    z = torch.zeros(n, 2)
    return Batch(z, z, torch.zeros(k, 2), d, sigma, torch.full((k,), -math.log(k)))


def test_ss_is_drc_eq9_with_its_n_factor():
    # sigma 1/2: q = softmax(-D); rows [.75, .25], [.25, .75], [.5, .5]; column sums 1.5 and 1.5
    ln3 = math.log(3.0)
    batch = _given([[0.0, ln3], [ln3, 0.0], [0.0, 0.0]], sigma=0.5)
    assert float(cluster_regularisation(torch.tensor([[.75, .25], [.25, .75], [.5, .5]]))) == (
        pytest.approx((1.5**2 + 1.5**2) / 3)
    )
    out = make_regulariser("ss", lam=2.0)(batch)
    assert out.labels.tolist() == [0, 1, 0]
    # pull: distances of the chosen centroids are 0, 0, 0; CR = 4.5 / 3 = 1.5; 2 sigma = 1
    assert float(out.loss.detach()) == pytest.approx(2.0 * 1.0 * 1.5, rel=1e-6)


def test_varm_is_the_variance_of_the_unnormalised_memberships():
    batch = _given([[0.0, 2.0], [2.0, 6.0]], sigma=0.5)  # s = -D: cluster means -1 and -4
    assert float(membership_variance(batch.distances.detach(), 0.5)) == pytest.approx(2.25)
    out = make_regulariser("varm", lam=1.0)(batch)
    assert out.labels.tolist() == [0, 0]
    assert float(out.loss.detach()) == pytest.approx((0.0 + 2.0) / 2 + 1.0 * 2.25, rel=1e-6)


def _cosine(f, g, d: torch.Tensor) -> float:
    ga = torch.autograd.grad(f(d), d)[0].flatten()
    gb = torch.autograd.grad(g(d), d)[0].flatten()
    return float(ga @ gb / (ga.norm() * gb.norm()))


def test_varm_is_not_a_rescaled_ss_gradient_direction():
    d = (torch.rand(64, 5, generator=torch.Generator().manual_seed(0)) * 8).requires_grad_()
    sigma = 1.0

    def ss(t: torch.Tensor) -> torch.Tensor:
        return cluster_regularisation(soft_assignment(t, sigma))

    def varm(t: torch.Tensor) -> torch.Tensor:
        return membership_variance(t, sigma)

    def variance_of_normalised(t: torch.Tensor) -> torch.Tensor:  # the old varm
        return soft_assignment(t, sigma).mean(0).var(unbiased=False)

    # the variance of normalised memberships is ss up to scale: the test can tell them apart
    assert _cosine(ss, variance_of_normalised, d) == pytest.approx(1.0, abs=1e-5)
    assert _cosine(ss, varm, d) < 0.9
