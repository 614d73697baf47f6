"""Every regulariser honours the interface: labels, a loss with gradients to f and mu."""

import math

import numpy as np
import pytest
import torch

from model import OnlineClusterer, metrics
from model.regularisers import REGULARISERS, Batch, make_regulariser

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


def test_none_collapses_where_ca_does_not():
    # Structureless data: nothing but the regulariser keeps the partition alive.
    X = np.random.default_rng(0).normal(size=(1200, 6)).astype(np.float32)
    ratio = {}
    for name in ("none", "ca"):
        clf = OnlineClusterer(4, name, latent_dim=16, seed=0, hidden=(32,), lr=1e-2)
        clf.fit(X, epochs=10, batch_size=128)
        ratio[name] = metrics.hard_entropy(clf.predict(X), 4) / math.log(4)
    assert ratio["none"] < 0.6
    assert ratio["ca"] > 0.95


def test_registry_lists_the_basic_methods():
    assert set(BASIC) <= set(REGULARISERS)
