"""The typed snapshot manifest: same JSON on disk, unknown fields kept, old manifests read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from oclust.model import OnlineClusterer
from oclust.model.snapshot import FORMAT, LEGACY_FORMAT, Manifest, Snapshot, SnapshotError


@pytest.fixture(scope="module")
def snap() -> Snapshot:
    X = np.random.default_rng(0).normal(size=(96, 5)).astype("float32")
    clf = OnlineClusterer(3, latent_dim=4, hidden=(8,), random_state=1, device="cpu",
                          prior="online").fit(X, batch_size=32)
    return clf.to_snapshot(offsets={"t:0": 96}, metrics={"loss": 0.5, "shares": [0.2, 0.8]})


def test_the_written_manifest_is_exactly_the_typed_one(snap: Snapshot) -> None:
    m = snap.meta
    assert m.to_dict() == snap.manifest  # every stored key is a field: nothing dropped or added
    assert (m.format, m.version, m.n_clusters, m.input_shape) == (FORMAT, 0, 3, (5,))
    assert m.offsets == {"t:0": 96} and m.samples_seen == 96 and m.steps == 3
    assert m.prior_mode == "online" and m.prior_state is not None and m.seed == 1
    assert m.metrics == {"loss": 0.5, "shares": [0.2, 0.8]} and m.sha256 == snap.sha256
    assert json.loads(snap.manifest_json()) == snap.manifest


def test_unknown_fields_are_kept_and_the_checksum_still_holds(snap: Snapshot) -> None:
    newer = Snapshot._sealed(snap.weights, {**snap.manifest, "future_field": {"a": 1}})
    stored = Snapshot.from_parts(newer.weights, newer.manifest_json())
    stored.verify()  # the unknown field is hashed as stored
    assert dict(stored.meta.extra) == {"future_field": {"a": 1}}
    assert stored.meta.to_dict()["future_field"] == {"a": 1}
    back = OnlineClusterer.from_snapshot(stored, device="cpu")
    assert back.n_clusters == 3
    republished = stored.with_version(4)
    republished.verify()
    assert republished.manifest["future_field"] == {"a": 1} and republished.meta.version == 4


def test_an_old_manifest_without_the_newer_fields_still_loads(snap: Snapshot) -> None:
    dropped = ("seed", "init", "prior_mode", "prior_state", "reg_params", "offsets", "steps",
               "integrity", "views")
    old = {k: v for k, v in snap.manifest.items() if k not in dropped}
    legacy = Snapshot(snap.weights, {**old, "format": LEGACY_FORMAT})
    m = legacy.meta
    assert (m.seed, m.init, m.prior_mode, m.offsets, m.steps) == (None, "kmeans", None, {}, 0)
    clf = OnlineClusterer.from_snapshot(legacy, device="cpu")
    assert clf.samples_seen_ == 96 and clf.steps_ == 0
    assert m.views is False and clf.views_ is False  # trained without: continues without


def test_adam_betas_are_saved_and_restored() -> None:
    X = np.random.default_rng(0).normal(size=(64, 5)).astype("float32")
    clf = OnlineClusterer(3, latent_dim=4, hidden=(8,), random_state=1, device="cpu",
                          betas=(0.8, 0.999)).fit(X, batch_size=32)
    snap = clf.to_snapshot()
    assert snap.manifest["betas"] == [0.8, 0.999]
    back = OnlineClusterer.from_snapshot(snap, device="cpu")
    assert back.optimizer_.param_groups[0]["betas"] == (0.8, 0.999)
    older = Snapshot._sealed(snap.weights, {k: v for k, v in snap.manifest.items() if k != "betas"})
    assert OnlineClusterer.from_snapshot(older, device="cpu").betas == (0.9, 0.99)  # the default


def test_missing_or_mistyped_fields_are_snapshot_errors(snap: Snapshot) -> None:
    with pytest.raises(SnapshotError, match="'offsets' is bad"):
        Manifest.from_dict({**snap.manifest, "offsets": [1, 2]})
    with pytest.raises(SnapshotError, match="'version' is bad"):
        int(Snapshot(snap.weights, {**snap.manifest, "version": "three"}).version)
    no_sigma = {k: v for k, v in snap.manifest.items() if k != "sigma"}
    with pytest.raises(SnapshotError, match="missing 'sigma'"):
        OnlineClusterer.from_snapshot(Snapshot.create(snap.weights, no_sigma), device="cpu")
    assert Manifest.from_dict({"created_at": "yesterday"}).created_at is None  # shown as unknown


def test_a_typed_manifest_can_be_published_as_is(snap: Snapshot) -> None:
    again = Snapshot.create(snap.weights, snap.meta)
    again.verify()
    assert {k: v for k, v in again.manifest.items() if k not in ("created_at", "integrity")} == {
        k: v for k, v in snap.manifest.items() if k not in ("created_at", "integrity")
    }
