"""Every registered regulariser honours the interface the clusterer and the service rely on.

Parametrised over the registry itself (the basic methods and the seeded baselines), so a newly
registered method is checked without editing this file: it builds for a data shape, ``forward``
gives N in-range int64 labels and a finite scalar loss that back-propagates, the serving
contract holds (``serving_centroids`` keeps K×m, ``serving_head`` is ``None`` or maps latents
to K logits) and its state survives a ``state_dict`` round trip.
"""

from __future__ import annotations

import math

import pytest
import torch

import oclust.model  # noqa: F401  (registers the seeded baselines)
from oclust.model.regularisers import REGULARISERS, Batch, make_regulariser

N, K, M, D = 24, 4, 5, 6  # batch, clusters, latent dim, input features


def _built(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    reg = make_regulariser(name)
    reg.build((D,), M, K)
    return reg


def _batch(seed: int = 0) -> tuple[Batch, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    enc = torch.nn.Linear(D, M)
    x = torch.randn(N, D)
    mu = torch.randn(K, M, requires_grad=True)
    return Batch.build(x, enc(x), mu, 1.0, torch.full((K,), -math.log(K)), enc), enc, mu


def test_the_registry_holds_the_basic_methods_and_the_baselines() -> None:
    assert {"ca", "none", "sk", "ent", "ss", "varm", "cm", "aecm", "ckm", "drc", "tcc"} <= set(
        REGULARISERS
    )
    assert all(cls.name == name for name, cls in REGULARISERS.items())


@pytest.mark.parametrize("name", sorted(REGULARISERS))
def test_forward_gives_labels_and_a_loss_with_gradients(name: str) -> None:
    reg = _built(name)
    batch, enc, mu = _batch()
    out = reg(batch)
    assert out.labels.shape == (N,) and out.labels.dtype == torch.int64
    assert int(out.labels.min()) >= 0 and int(out.labels.max()) < K
    assert out.loss.dim() == 0 and math.isfinite(float(out.loss.detach()))
    assert out.loss.requires_grad
    out.loss.backward()
    trained = [enc.weight, mu, *reg.parameters()]
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in trained), name


@pytest.mark.parametrize("name", sorted(REGULARISERS))
def test_serving_contract(name: str) -> None:
    reg = _built(name)
    batch, _, mu = _batch()
    reg(batch)
    reg.after_step(mu.detach())
    centroids = reg.serving_centroids(mu.detach())
    assert centroids.shape == (K, M) and bool(torch.isfinite(centroids).all())
    head = reg.serving_head()
    if head is not None:
        assert isinstance(head, torch.nn.Module)
        with torch.no_grad():
            logits = head(torch.randn(N, M))
        assert logits.shape == (N, K) and bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("name", sorted(REGULARISERS))
def test_state_dict_round_trip(name: str) -> None:
    reg = _built(name, seed=0)
    batch, _, mu = _batch()
    reg(batch)
    reg.after_step(mu.detach())  # moving averages and the like move away from their init
    state = reg.state_dict()
    copy = _built(name, seed=1)  # different initial weights
    copy.load_state_dict(state)
    restored = copy.state_dict()
    assert restored.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(restored[key], value), (name, key)
    z = torch.randn(N, M)
    assert torch.equal(copy.serving_centroids(mu.detach()), reg.serving_centroids(mu.detach()))
    if reg.serving_head() is not None:
        with torch.no_grad():
            assert torch.equal(copy.serving_head()(z), reg.serving_head()(z))
