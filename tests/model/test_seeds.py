"""The other seeds' regularisers (cm, aecm, ckm, drc, tcc): interface, equations, no collapse."""

import math

import numpy as np
import pytest
import torch

import oclust.model.seeds
from oclust.model import OnlineClusterer, metrics
from oclust.model.regularisers import REGULARISERS, Batch, make_regulariser
from oclust.model.seeds import cm_terms, gumbel_softmax, nt_xent

SEEDS = ["cm", "aecm", "ckm", "drc", "tcc"]


def _batch(k: int = 4, m: int = 5, n: int = 32) -> tuple[Batch, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    enc = torch.nn.Linear(3, m)
    x = torch.randn(n, 3)
    mu = torch.randn(k, m, requires_grad=True)
    return Batch.build(x, enc(x), mu, 1.0, torch.full((k,), -math.log(k)), enc), enc, mu


def _built(name: str, k: int = 4, m: int = 5):
    reg = make_regulariser(name)
    reg.build((3,), m, k)
    return reg


def _mixture(seed: int = 0, n: int = 1200, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(k, 6))
    y = rng.integers(k, size=n)
    return (centres[y] + rng.normal(size=(n, 6))).astype(np.float32), y


def test_all_seeds_are_registered():
    assert set(SEEDS) <= set(REGULARISERS)
    assert {n for n in SEEDS if REGULARISERS[n].uses_views} == {"drc", "tcc"}


@pytest.mark.parametrize("name", SEEDS)
def test_interface_shapes_and_gradients(name):
    batch, enc, mu = _batch()
    out = _built(name)(batch)
    assert out.labels.shape == (32,) and out.labels.dtype == torch.int64
    assert int(out.labels.min()) >= 0 and int(out.labels.max()) < 4
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0, "encoder"
    assert mu.grad is not None and mu.grad.abs().sum() > 0, "centroids"


def test_cm_terms_match_a_hand_computed_example():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    gamma = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    mu = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = cm_terms(z, gamma, mu, torch.zeros(2), torch.tensor([2.0, 3.0]), lam=0.5, scale2=1.0)
    # reconstruction rows: [1, .25] and [1, .5]; squared errors .0625 and 3.25, over N*m = 4
    assert float(t.reconstruction) == pytest.approx(3.3125 / 4)
    # Gini: .375 + .5 over N*m
    assert float(t.sparsity) == pytest.approx(0.875 / 4)
    # mu mu^T - I = [[0, 1], [1, 1]] -> L1 3, times lambda .5
    assert float(t.orthonormality) == pytest.approx(1.5)
    # (1 - 2) log .625 + (1 - 3) log .375
    assert float(t.dirichlet) == pytest.approx(-math.log(0.625) - 2 * math.log(0.375))
    assert float(t.total()) == pytest.approx(3.3125 / 4 + 0.875 / 4 + 1.5 + 2.431663, rel=1e-5)


def test_cm_reconstruction_plus_sparsity_is_the_expected_distance_for_orthonormal_centroids():
    g = torch.Generator().manual_seed(1)
    n, m, k, s2 = 16, 6, 3, 4.0
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    mu = q.T * math.sqrt(s2)  # mu mu^T = s2 I
    z = torch.randn(n, m, generator=g, dtype=torch.float64)
    gamma = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64), 1)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    t = cm_terms(z, gamma, mu, b, torch.ones(k, dtype=torch.float64), 1.0, s2)
    expected = (gamma * ((z[:, None, :] - mu[None] - b) ** 2).sum(2)).sum() / (n * m)
    assert float(t.reconstruction + t.sparsity) == pytest.approx(float(expected), rel=1e-9)
    assert float(t.orthonormality) == pytest.approx(0.0, abs=1e-9)


def test_cm_dirichlet_concentrations_follow_the_prior():
    reg = _built("cm", k=4)
    uniform = reg.concentrations(torch.full((4,), -math.log(4)))
    assert torch.allclose(uniform, torch.full((4,), reg.alpha))
    skewed = reg.concentrations(torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1])))
    assert skewed[0] > skewed[1] > skewed[2] > skewed[3] > 1.0


def test_cm_head_starts_at_the_nearest_centroid_posterior():
    batch, _, _ = _batch()
    reg = _built("cm")
    out = reg(batch)
    assert torch.equal(out.labels, batch.distances.detach().argmin(1))


def test_cm_serves_the_moving_average_of_the_centroids_plus_bias():
    reg = make_regulariser("cm", ema=0.5)
    reg.build((3,), 2, 2)
    with torch.no_grad():
        reg.bias.fill_(1.0)
    c0 = torch.zeros(2, 2)
    assert torch.equal(reg.serving_centroids(c0), c0 + 1.0)  # before any step: trained + bias
    reg.after_step(torch.full((2, 2), 2.0))
    reg.after_step(torch.full((2, 2), 4.0))
    # first step copies, then 0.5 * 2 + 0.5 * 4 = 3, plus the bias
    assert torch.allclose(reg.serving_centroids(c0), torch.full((2, 2), 4.0))


def test_aecm_adds_the_beta_weighted_input_reconstruction():
    batch, _, _ = _batch()
    torch.manual_seed(3)
    aecm = make_regulariser("aecm", beta=2.0)
    aecm.build((3,), 5, 4)
    cm = make_regulariser("cm")
    cm.build((3,), 5, 4)
    cm.load_state_dict({k: v for k, v in aecm.state_dict().items() if not k.startswith("dec")})
    with torch.no_grad():
        recon = torch.mean((aecm.decoder(batch.z) - batch.x) ** 2)
        extra = aecm(batch).loss - cm(batch).loss
    assert float(extra) == pytest.approx(2.0 * float(recon), rel=1e-5)


def test_gumbel_softmax_is_seeded_and_follows_the_logits():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(4000, 3)
    a = gumbel_softmax(logits, 0.1, torch.Generator().manual_seed(0))
    b = gumbel_softmax(logits, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    freq = torch.bincount(a.argmax(1), minlength=3).double() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=0.03)


def test_nt_xent_prefers_matching_views():
    a = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    assert nt_xent(a, a, 0.5) < nt_xent(a, a.roll(1, 0), 0.5)


@pytest.mark.parametrize("name", SEEDS)
def test_short_run_on_gaussian_mixture_does_not_collapse(name):
    X, _ = _mixture()
    clf = OnlineClusterer(4, name, latent_dim=16, seed=0, hidden=(32,))
    clf.fit(X, epochs=4, batch_size=128)
    pred = clf.predict(X)
    assert metrics.hard_entropy(pred, 4) > 0.75 * math.log(4), name


@pytest.mark.parametrize("name", SEEDS)
def test_structureless_data_keeps_every_cluster_alive(name):
    # The control `none` falls to ~0.5 of log K here (tests/model/test_regularisers.py).
    X = np.random.default_rng(0).normal(size=(1200, 6)).astype(np.float32)
    clf = OnlineClusterer(4, name, latent_dim=16, seed=0, hidden=(32,), lr=1e-2)
    clf.fit(X, epochs=10, batch_size=128)
    assert metrics.hard_entropy(clf.predict(X), 4) > 0.9 * math.log(4), name


@pytest.mark.parametrize("name", SEEDS)
def test_snapshot_round_trip_predicts_and_trains_identically(name):
    X, _ = _mixture(n=512)
    clf = OnlineClusterer(4, name, latent_dim=8, seed=0, hidden=(16,))
    clf.fit(X, epochs=2, batch_size=128)
    clone = OnlineClusterer.from_snapshot(clf.to_snapshot())
    np.testing.assert_array_equal(clone.predict(X), clf.predict(X))
    # The regulariser's state (moving average, seeded view stream, head) carries over too.
    a, b = clf.partial_fit(X[:128]).last_step_, clone.partial_fit(X[:128]).last_step_
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    np.testing.assert_array_equal(clone.predict(X), clf.predict(X))


@pytest.mark.parametrize("name", ["ckm", "drc", "tcc"])
def test_random_methods_are_reproducible_from_the_seed(name):
    X, _ = _mixture(n=256)
    runs = [OnlineClusterer(4, name, latent_dim=8, seed=s, hidden=(16,)) for s in (0, 0, 1)]
    losses = [
        [c.partial_fit(X[i : i + 64]).last_step_.loss for i in range(0, 256, 64)] for c in runs
    ]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_view_methods_need_the_encoder():
    batch, _, _ = _batch()
    batch.encode = None
    with pytest.raises(ValueError, match="needs the encoder"):
        _built("drc")(batch)


def test_only_view_methods_augment(monkeypatch):
    calls = []
    real = model.seeds.augment

    def counting(x, g, kind="auto"):
        calls.append(kind)
        return real(x, g, kind)

    monkeypatch.setattr(model.seeds, "augment", counting)
    X, _ = _mixture(n=256)
    for name in sorted(REGULARISERS):
        calls.clear()
        OnlineClusterer(4, name, latent_dim=8, seed=0, hidden=(16,)).partial_fit(X)
        assert bool(calls) == REGULARISERS[name].uses_views, name
