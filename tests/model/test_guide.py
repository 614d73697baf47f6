"""The input guide (``oclust.model.guide``): CA's first steps also weigh where each input lies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oclust.model import OnlineClusterer
from oclust.model.guide import STEPS, InputGuide
from oclust.model.inference import load
from oclust.model.regularisers import Batch, CombinationAssignment, pull
from oclust.model.snapshot import Snapshot, SnapshotError, pack_tensors, unpack_tensors

SMALL = {"hidden": (32,), "latent_dim": 8, "device": "cpu"}


def _blobs(n: int = 640, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(4, 6))
    return (centres[rng.integers(0, 4, n)] + rng.normal(size=(n, 6))).astype(np.float32)


def test_auto_guides_the_mlp_with_ca_and_standardised_inputs_only():
    X = _blobs(64)
    m = OnlineClusterer(n_clusters=3, seed=0, **SMALL).partial_fit(X)
    assert m.input_guide_ == STEPS and m.guide_ is not None and m.guide_.means is not None
    for kw in ({"regulariser": "sk"}, {"standardize": False}, {"input_guide": 0}):
        m = OnlineClusterer(n_clusters=3, seed=0, **SMALL, **kw).partial_fit(X)
        assert m.input_guide_ == 0 and m.guide_ is None, kw
    windows = np.random.default_rng(0).normal(size=(16, 3, 32)).astype(np.float32)
    conv = OnlineClusterer(n_clusters=3, seed=0, device="cpu").partial_fit(windows)
    assert conv.input_guide_ == 0
    assert OnlineClusterer(n_clusters=3, input_guide=7, **SMALL).partial_fit(X).input_guide_ == 7


@pytest.mark.parametrize("bad", [-1, 1.5, True, "x", None])
def test_a_bad_input_guide_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="input_guide must be"):
        OnlineClusterer(input_guide=bad).validate_params()


def test_an_input_guide_for_another_regulariser_is_refused():
    with pytest.raises(ValueError, match="input_guide leans CA's"):
        OnlineClusterer(regulariser="sk", input_guide=5).validate_params()
    OnlineClusterer(regulariser="sk", input_guide=0).validate_params()


def test_ca_assigns_by_the_guided_cost_and_pulls_by_the_latent_distance():
    x = torch.cat([torch.zeros(8, 2), torch.full((8, 2), 5.0)])  # two input blobs
    z = torch.zeros(16, 4, requires_grad=True)  # latents that tell nothing apart
    mu = torch.stack([torch.ones(4), -torch.ones(4)])  # both centroids equally far
    batch = Batch.build(x, z, mu, 10.0, torch.log(torch.full((2,), 0.5)))
    ca = CombinationAssignment()
    unguided = ca(batch).labels.tolist()
    assert unguided != [0] * 8 + [1] * 8  # by count alone: alternating
    guide = InputGuide(steps=10)
    guide.means, guide.scale = torch.tensor([[0.0, 0.0], [5.0, 5.0]]), 1.0
    batch.guide = guide.costs(x, step=0)
    out = ca(batch)
    assert out.labels.tolist() == [0] * 8 + [1] * 8  # by input blob
    assert torch.equal(out.loss, pull(batch.distances, out.labels))  # no guide in the loss
    out.loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert guide.costs(x, step=10) is None and InputGuide(0).costs(x, 0) is None


def test_the_guide_follows_the_inputs_each_step_assigns():
    g = InputGuide(steps=4, rate=0.5)
    x = torch.tensor([[0.0], [2.0], [10.0], [12.0]])
    g.start(x, torch.tensor([[0.0, 1.0], [1.0, 0.0], [3.0, 3.0], [4.0, 3.0]]),
            torch.tensor([0, 0, 1, 1]), n_clusters=3)
    assert g.means is not None
    assert g.means.ravel().tolist() == [1.0, 11.0, 6.0]  # cluster 2 empty: the batch's mean
    g.update(torch.tensor([[3.0], [5.0]]), torch.tensor([0, 2]))
    assert g.means.ravel().tolist() == [2.0, 11.0, 5.5]  # halfway to 3 and to 5
    early, late = g.costs(x, 0), g.costs(x, 3)
    assert early is not None and late is not None
    torch.testing.assert_close(late, early / 4)  # blended out linearly


def test_a_model_restored_while_guided_trains_on_exactly_as_the_uninterrupted_one():
    X = _blobs()
    a = OnlineClusterer(n_clusters=4, seed=0, **SMALL)
    for i in range(5):
        a.partial_fit(X[i * 64 : (i + 1) * 64])
    snap = a.to_snapshot()
    assert {"guide.means", "guide.scale"} <= set(unpack_tensors(snap.weights))
    assert snap.meta.input_guide == STEPS
    b = OnlineClusterer.from_snapshot(snap, device="cpu")
    unguided = OnlineClusterer.from_snapshot(snap, device="cpu")
    unguided.guide_ = None  # as if the snapshot had not kept the guide
    for i in range(5, 10):
        for m in (a, b, unguided):
            m.partial_fit(X[i * 64 : (i + 1) * 64])
    assert torch.equal(a.centroids_, b.centroids_)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    assert not torch.equal(a.centroids_, unguided.centroids_)  # the kept state mattered
    served = load(snap)  # replicas serve a guided snapshot; the guide is training state only
    np.testing.assert_array_equal(served(X).labels,
                                  OnlineClusterer.from_snapshot(snap).predict(X))


def test_after_its_steps_the_guide_is_off_and_snapshots_carry_none_of_it():
    X = _blobs(256)
    m = OnlineClusterer(n_clusters=4, seed=0, input_guide=3, **SMALL)
    for i in range(4):
        m.partial_fit(X[i * 64 : (i + 1) * 64])
    assert m.guide_ is not None and m.guide_.costs(torch.as_tensor(X[:4]), m.steps_) is None
    snap = m.to_snapshot()
    assert not any(k.startswith("guide.") for k in unpack_tensors(snap.weights))
    restored = OnlineClusterer.from_snapshot(snap, device="cpu")
    assert restored.input_guide_ == 3 and restored.guide_ is not None
    assert restored.guide_.means is None  # nothing left to guide


def test_a_manifest_without_the_field_restores_an_unguided_model():
    X = _blobs(128)
    snap = OnlineClusterer(n_clusters=4, seed=0, **SMALL).partial_fit(X).to_snapshot()
    manifest = {k: v for k, v in snap.manifest.items() if k != "input_guide"}
    older = Snapshot.create(snap.weights, manifest)
    restored = OnlineClusterer.from_snapshot(older, device="cpu")
    assert restored.input_guide_ == 0 and restored.guide_ is None


def test_guide_tensors_that_do_not_fit_are_refused():
    X = _blobs(128)
    snap = OnlineClusterer(n_clusters=4, seed=0, **SMALL).partial_fit(X).to_snapshot()
    tensors = unpack_tensors(snap.weights)
    tensors["guide.means"] = torch.zeros(4, 5)  # 6 features
    bad = Snapshot.create(pack_tensors(tensors), dict(snap.manifest))
    with pytest.raises(SnapshotError, match="input guide tensors"):
        OnlineClusterer.from_snapshot(bad, device="cpu")
    only_means = {k: v for k, v in tensors.items() if k != "guide.scale"}
    with pytest.raises(SnapshotError, match="expected 'means' and 'scale'"):
        OnlineClusterer.from_snapshot(
            Snapshot.create(pack_tensors(only_means), dict(snap.manifest)), device="cpu")


def test_a_first_batch_of_one_row_leaves_the_guide_to_start_on_the_next():
    X = _blobs(129)
    m = OnlineClusterer(n_clusters=4, seed=0, **SMALL).partial_fit(X[:1])
    assert m.guide_ is not None and not m.guide_.started  # one row: no spread to scale by
    m.partial_fit(X[1:])
    assert m.guide_.started and m.guide_.scale > 0 and m.input_guide_ == STEPS


def test_a_guided_snapshot_without_the_guides_state_is_refused():
    X = _blobs(128)
    snap = OnlineClusterer(n_clusters=4, seed=0, **SMALL).partial_fit(X).to_snapshot()
    tensors = {k: v for k, v in unpack_tensors(snap.weights).items()
               if not k.startswith("guide.")}
    bad = Snapshot.create(pack_tensors(tensors), dict(snap.manifest))
    with pytest.raises(SnapshotError, match="hold no input guide"):
        OnlineClusterer.from_snapshot(bad, device="cpu")


@pytest.mark.parametrize("change", [
    {"guide.scale": torch.tensor(-5.0, dtype=torch.float64)},
    {"guide.scale": torch.tensor(5)},
    {"guide.means": torch.zeros(4, 6, dtype=torch.int64)},
])
def test_guide_tensors_of_a_bad_value_or_type_are_refused(change: dict) -> None:
    X = _blobs(128)
    snap = OnlineClusterer(n_clusters=4, seed=0, **SMALL).partial_fit(X).to_snapshot()
    tensors = unpack_tensors(snap.weights) | change
    bad = Snapshot.create(pack_tensors(tensors), dict(snap.manifest))
    with pytest.raises(SnapshotError, match="input guide tensors"):
        OnlineClusterer.from_snapshot(bad, device="cpu")
