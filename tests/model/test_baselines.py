"""The baselines follow their papers: CM/AE-CM serve their own rule, DRC's contrast is eq. 5."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oclust.model import OnlineClusterer, datasets
from oclust.model.regularisers import Batch, make_regulariser, sq_distances
from oclust.model.seeds import drc_contrast, gumbel_softmax, nt_xent
from oclust.service.app import create_app
from oclust.service.loader import LoadedModel, ModelHolder
from oclust.service.settings import ServiceSettings
from tests.service.test_service_api import Client


# --------------------------------------------------------------------------- CM / AE-CM serving
@pytest.fixture(scope="module", params=["cm", "aecm"])
def trained(request: pytest.FixtureRequest) -> tuple[OnlineClusterer, np.ndarray]:
    X, _ = datasets.load("digits")
    X = X.reshape(len(X), -1)[:768]
    clf = OnlineClusterer(10, request.param, latent_dim=16, hidden=(32,), seed=0, device="cpu")
    clf.fit(X, epochs=3, batch_size=128)
    return clf, X


def _own_rule(clf: OnlineClusterer, X: np.ndarray) -> np.ndarray:
    """What training computes: the regulariser's labels (argmax gamma) on the latents of X."""
    z = torch.from_numpy(clf.transform(X))
    batch = Batch.build(torch.from_numpy(X), z, clf.centroids_.detach(), clf.sigma_,
                        clf.log_prior_)
    with torch.no_grad():
        return clf.reg_(batch).labels.numpy()


def test_cm_predict_is_the_modules_own_rule(trained) -> None:
    clf, X = trained
    pred = clf.predict(X)
    np.testing.assert_array_equal(pred, _own_rule(clf, X))
    z = torch.from_numpy(clf.transform(X))
    with torch.no_grad():
        gamma = clf.reg_.responsibilities(z).double().numpy()
    np.testing.assert_allclose(clf.soft_assign(X), gamma, rtol=1e-5, atol=1e-6)
    # the served rule matters: the nearest (moving-average) centroid disagrees on some points
    served_mu = clf.reg_.serving_centroids(clf.centroids_).detach()
    d = sq_distances(z, served_mu).double().numpy()
    nearest = d.argmin(1)
    assert (nearest != pred).any()
    # the served distance is the one to the chosen serving centroid
    _, dist = clf.assign(X)
    np.testing.assert_allclose(dist, d[np.arange(len(X)), pred])


def test_cm_service_serves_the_training_rule_on_every_point(trained) -> None:
    clf, X = trained
    model = LoadedModel.from_snapshot(clf.to_snapshot().with_version(1))
    assert model.infer.backend == "compiled"  # the kernel applies the clustering module's head
    want = _own_rule(clf, X)
    np.testing.assert_array_equal(model.assign(X).labels, want)  # batches: 100%
    singles = np.array([model.assign(X[i : i + 1]).labels[0] for i in range(len(X))])
    np.testing.assert_array_equal(singles, want)  # single samples: 100%
    api = Client(create_app(ServiceSettings(), _holder(model)))
    r = api.post("/assign/batch", json={"items": X[:256].tolist()})
    assert r.status_code == 200, r.text
    assert r.json()["clusters"] == want[:256].tolist()
    for i in range(0, 40):
        r = api.post("/assign", json={"features": X[i].tolist()})
        assert r.status_code == 200 and r.json()["cluster"] == want[i], r.text


@pytest.mark.parametrize("name", ["cm", "aecm"])
def test_cm_serves_from_its_head_from_the_first_step(name) -> None:
    # The head is built lazily by the first forward pass: the served labels of that step (what
    # the collapse guard judges) must come from it, not from the untrained linear map.
    X, _ = datasets.load("digits")
    X = X.reshape(len(X), -1)[:512]
    clf = OnlineClusterer(10, name, latent_dim=16, hidden=(32,), seed=0, device="cpu",
                          standardize=False)  # predict before a step: the step's scaler
    clf.partial_fit(X[:64])
    step = clf.last_step_  # the served pass normalises by BatchNorm's running statistics, which
    # the first step primes with the batch's (unbiased variance), the training pass by the batch's
    assert (step.served_labels == step.labels).mean() >= 0.95  # the untrained map: about 0.1
    for start in range(64, len(X), 64):  # later: what predict served before the step
        before = clf.predict(X[start : start + 64])
        clf.partial_fit(X[start : start + 64])
        np.testing.assert_array_equal(clf.last_step_.served_labels, before, err_msg=str(start))


@pytest.mark.parametrize("name", ["ca", "cm"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (6, 64), (16,)], ids=["convnet", "conv1d", "mlp"])
def test_batchnorm_encoders_report_the_labels_predict_serves(name, shape) -> None:
    # BatchNorm normalises a training batch by its own statistics and inference by the running
    # ones: the guard must judge the labels predict (and /assign) gives, not the training pass's
    X = np.random.default_rng(0).normal(size=(8 * 128, *shape)).astype(np.float32)
    X += np.repeat(np.arange(4, dtype=np.float32), 256).reshape(-1, *[1] * len(shape))  # groups
    clf = OnlineClusterer(4, name, latent_dim=16, hidden=(8, 8), standardize=False, seed=0)
    clf.partial_fit(X[:128])
    assert clf._batchnorm  # every encoder has BatchNorm layers: the passes differ
    for start in range(128, len(X), 128):
        before = clf.predict(X[start : start + 128])
        clf.partial_fit(X[start : start + 128])
        np.testing.assert_array_equal(clf.last_step_.served_labels, before, err_msg=str(start))


def test_batchnorm_running_statistics_carry_no_start_up_bias() -> None:
    # Inference normalises by BatchNorm's running mean; started at 0 with momentum 0.1 it would
    # stay mostly 0 for the first steps (a fresh model then serves nearly everything to one
    # cluster). Until the momentum reaches 0.1 it is the plain average of the batches so far.
    X = np.random.default_rng(0).normal(loc=50.0, size=(4 * 16, 6, 32)).astype(np.float32)
    clf = OnlineClusterer(2, latent_dim=8, standardize=False, seed=0)
    clf.partial_fit(X[:16])
    layer = clf._batchnorm[0]
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(
        lambda mod, inp, out: seen.append(inp[0].mean(dim=(0, 2)).detach()) if mod.training
        else None)
    before = layer.running_mean.clone()
    for start in range(16, 48, 16):
        clf.partial_fit(X[start : start + 16])
    hook.remove()
    # steps 2 and 3 weigh 1/2 and 1/3: the mean of the three batches' means
    expected = (before + seen[0] + seen[1]) / 3.0
    torch.testing.assert_close(layer.running_mean, expected, rtol=1e-4, atol=1e-4)
    for _ in range(12):
        clf.partial_fit(X[:16])
    assert layer.momentum == pytest.approx(0.1)  # then BatchNorm's usual moving average


def _holder(model: LoadedModel) -> ModelHolder:
    holder = ModelHolder()
    holder.swap(model)
    return holder


# --------------------------------------------------------------------------- DRC
def test_drc_contrast_is_eq5_on_a_hand_computed_case() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # cosine similarities a_i . b_j: [[1/sqrt2, 0], [1/sqrt2, 1]]; tau = 1/2 doubles them;
    # negatives are the other view's rows only (one direction)
    s = 2.0 / math.sqrt(2.0)
    row0 = -math.log(math.exp(s) / (math.exp(s) + math.exp(0.0)))
    row1 = -math.log(math.exp(2.0) / (math.exp(s) + math.exp(2.0)))
    assert float(drc_contrast(a, b, 0.5)) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert float(nt_xent(a, b, 0.5)) != pytest.approx((row0 + row1) / 2, rel=1e-3)


def _drc_batch() -> tuple[Batch, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    mu = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(6, 4)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    batch = Batch.build(x, x, mu, 2.0, torch.full((3,), -math.log(3)), lambda t: t)
    return batch, z1, z2


@pytest.mark.parametrize("contrast", ["paper", "ntxent"])
def test_drc_contrasts_the_k_dimensional_assignment_features(monkeypatch, contrast) -> None:
    batch, z1, z2 = _drc_batch()
    reg = make_regulariser("drc", contrast=contrast)
    reg.build((4,), 4, 3)
    monkeypatch.setattr(reg, "_views", lambda _b: (z1, z2, None))
    loss = reg(batch).loss
    mu = batch.centroids
    af1 = -((z1[:, None] - mu[None]) ** 2).sum(-1) / 4.0  # -D / (2 sigma), N×K
    af2 = -((z2[:, None] - mu[None]) ** 2).sum(-1) / 4.0
    p1, p2 = af1.softmax(1), af2.softmax(1)
    cr = ((p1.sum(0) ** 2).sum() + (p2.sum(0) ** 2).sum()) / 6 / 2
    fn = drc_contrast if contrast == "paper" else nt_xent
    want = fn(af1, af2, 0.5) + fn(p1.T, p2.T, 0.95) + 0.005 * cr
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)


def test_drc_rejects_an_unknown_contrast() -> None:
    with pytest.raises(ValueError, match="contrast must be"):
        make_regulariser("drc", contrast="simclr")


# --------------------------------------------------------------------------- TCC
def test_tcc_loss_is_the_documented_sum(monkeypatch) -> None:
    batch, z1, z2 = _drc_batch()
    reg = make_regulariser("tcc", lam=0.5)
    reg.build((4,), 4, 3)
    monkeypatch.setattr(reg, "_views", lambda _b: (z1, z2, torch.Generator().manual_seed(7)))
    loss = reg(batch).loss
    mu, g = batch.centroids, torch.Generator().manual_seed(7)
    logq1 = torch.log_softmax(-((z1[:, None] - mu[None]) ** 2).sum(-1) / 4.0, 1)
    logq2 = torch.log_softmax(-((z2[:, None] - mu[None]) ** 2).sum(-1) / 4.0, 1)
    pi1, pi2 = gumbel_softmax(logq1, 1.0, g), gumbel_softmax(logq2, 1.0, g)
    h1, h2 = z1 / z1.norm(dim=1, keepdim=True), z2 / z2.norm(dim=1, keepdim=True)
    r1 = pi1.T @ h1
    r2 = pi2.T @ h2
    r1, r2 = r1 / r1.norm(dim=1, keepdim=True), r2 / r2.norm(dim=1, keepdim=True)
    q_bar = (logq1.exp().mean(0) + logq2.exp().mean(0)) / 2
    kl = (q_bar * (q_bar.log() - math.log(1 / 3))).sum()  # KL of the batch marginal, uniform p
    # cluster contrast (tau 1) + unconditioned instance contrast (tau 0.5): the documented form
    want = nt_xent(r1, r2, 1.0) + nt_xent(h1, h2, 0.5) + 0.5 * kl
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
