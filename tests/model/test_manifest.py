"""The typed snapshot manifest: same JSON on disk, unknown fields kept, old manifests read."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from oclust.model import OnlineClusterer
from oclust.model.encoder_config import EncoderConfig
from oclust.model.inference import load
from oclust.model.snapshot import (
    FORMAT,
    LEGACY_FORMAT,
    Manifest,
    Snapshot,
    SnapshotError,
    pack_tensors,
    unpack_tensors,
)


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
               "integrity", "views", "feature_names")
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
    with pytest.raises(SnapshotError, match="'feature_names' is bad"):
        Manifest.from_dict({**snap.manifest, "feature_names": "abc"})
    with pytest.raises(SnapshotError, match="'version' is bad"):
        int(Snapshot(snap.weights, {**snap.manifest, "version": "three"}).version)
    no_sigma = {k: v for k, v in snap.manifest.items() if k != "sigma"}
    with pytest.raises(SnapshotError, match="missing 'sigma'"):
        OnlineClusterer.from_snapshot(Snapshot.create(snap.weights, no_sigma), device="cpu")
    assert Manifest.from_dict({"created_at": "yesterday"}).created_at is None  # shown as unknown


@pytest.mark.parametrize("stored", [b"[" * 100000, b'{"a": ' * 100000, "[" * 100000])
def test_a_manifest_nested_too_deeply_is_a_snapshot_error(snap: Snapshot, stored) -> None:
    with pytest.raises(SnapshotError, match="not JSON: nested too deeply"):  # a RecursionError
        Snapshot.from_parts(snap.weights, stored)


def test_a_typed_manifest_can_be_published_as_is(snap: Snapshot) -> None:
    again = Snapshot.create(snap.weights, snap.meta)
    again.verify()
    assert {k: v for k, v in again.manifest.items() if k not in ("created_at", "integrity")} == {
        k: v for k, v in snap.manifest.items() if k not in ("created_at", "integrity")
    }


def _without_hidden_norm(snap: Snapshot, weights: dict | None = None) -> Snapshot:
    """``snap`` as a manifest without the encoder's ``hidden_norm`` reads it (an older replica,
    or a snapshot saved before the field), with ``weights`` in place of its own if given."""
    encoder = {k: v for k, v in snap.manifest["encoder"].items() if k != "hidden_norm"}
    packed = snap.weights if weights is None else pack_tensors(weights)
    return Snapshot.create(packed, {**snap.manifest, "encoder": encoder})


def test_an_mlp_saved_before_hidden_batchnorm_serves_as_it_trained(snap: Snapshot) -> None:
    # the MLP of that time: Linear, ReLU, Linear (no BatchNorm at net.1), no optimiser state
    old = {key.replace("encoder.0.net.3.", "encoder.0.net.2."): value
           for key, value in unpack_tensors(snap.weights).items()
           if not key.startswith(("encoder.0.net.1.", "optim."))}
    legacy = _without_hidden_norm(snap, old)
    clf = OnlineClusterer.from_snapshot(legacy, device="cpu")
    assert clf.encoder_config_.hidden_norm == "none" and not clf._batchnorm
    X = np.random.default_rng(1).normal(size=(64, 5)).astype("float32")
    served = load(legacy)
    assert served.backend == "compiled"
    np.testing.assert_array_equal(served(X).labels, clf.predict(X))
    clf.partial_fit(X)  # and it trains on as it was


def test_a_new_mlp_read_as_an_old_one_is_refused_not_served_wrongly(snap: Snapshot) -> None:
    old_reading = _without_hidden_norm(snap)  # an older replica finds net.3 where it wants net.2
    with pytest.raises(SnapshotError, match="weights do not fit"):
        OnlineClusterer.from_snapshot(old_reading, device="cpu")
    with pytest.raises(SnapshotError, match="weights do not fit"):
        load(old_reading)


def test_hidden_norm_is_checked() -> None:
    assert EncoderConfig.for_shape((5,)).hidden_norm == "batch"
    assert EncoderConfig.from_dict({"kind": "mlp", "input_shape": [5], "latent_dim": 4,
                                    "hidden": [8]}).hidden_norm == "none"  # saved before it
    assert EncoderConfig.from_dict({"kind": "convnet", "input_shape": [8, 8], "latent_dim": 4,
                                    "hidden": [8]}).hidden_norm == "batch"  # convs always had it
    with pytest.raises(ValueError, match="'none' is for the MLP only: the 'convnet' encoder"):
        EncoderConfig("convnet", (8, 8), hidden_norm="none")
    with pytest.raises(ValueError, match="hidden_norm must be one of batch, none, got 'layer'"):
        EncoderConfig("mlp", (5,), hidden_norm="layer")
    with pytest.raises(ValueError, match="hidden_norm must be one of"):
        OnlineClusterer(hidden_norm="layer").validate_params()
    with pytest.raises(ValueError, match="'none' is for the MLP only"):  # at the first batch
        OnlineClusterer(2, hidden_norm="none").partial_fit(np.zeros((4, 8, 8)))


@pytest.mark.parametrize(
    ("field", "value"),
    [("standardize", "false"), ("views", "no"), ("n_clusters", 4.9), ("steps", "5"),
     ("samples_seen", -3), ("offsets", {"t:0": -1}), ("input_shape", [5.5])],
)
def test_a_field_of_the_wrong_type_is_refused_not_coerced(snap: Snapshot, field, value) -> None:
    with pytest.raises(SnapshotError, match=f"'{field}' is bad"):  # bool("false") was True
        Manifest.from_dict({**snap.manifest, field: value})


def _with_tensors(snap: Snapshot, **changes: object) -> Snapshot:
    tensors = unpack_tensors(snap.weights) | changes
    return Snapshot.create(pack_tensors(tensors), {**snap.manifest})


def test_weights_that_do_not_fit_are_refused_when_resuming(snap: Snapshot) -> None:
    import torch

    t = unpack_tensors(snap.weights)
    bad = {
        "centroids of one row": {"centroids": t["centroids"][:1]},  # copy_ broadcast it to K
        "moments of another shape": {"optim.0.exp_avg": torch.zeros(3)},
        "a step that is not a scalar": {"optim.0.step": torch.zeros(2)},
        "NaN weights": {"encoder.0.net.0.weight": torch.full_like(
            t["encoder.0.net.0.weight"], float("nan"))},
    }
    for what, change in bad.items():
        with pytest.raises(SnapshotError):
            OnlineClusterer.from_snapshot(_with_tensors(snap, **change), device="cpu")
            pytest.fail(f"{what} loaded")
    OnlineClusterer.from_snapshot(_with_tensors(snap), device="cpu")  # unchanged: it loads


def test_unusable_adam_state_is_dropped_so_the_model_trains_on(
    snap: Snapshot, caplog: pytest.LogCaptureFixture
) -> None:
    """NaN or infinite moments (or a NaN step) used to load, and the first step then raised
    FloatingPointError, stopping the worker that resumed from the snapshot, again and again."""
    import torch

    caplog.set_level(logging.WARNING, logger="oclust.model.checkpoint")
    t = unpack_tensors(snap.weights)
    X = np.random.default_rng(1).normal(size=(32, 5)).astype("float32")
    for change in ({"optim.0.exp_avg": torch.full_like(t["optim.0.exp_avg"], float("nan"))},
                   {"optim.1.exp_avg_sq": torch.full_like(t["optim.1.exp_avg_sq"], float("inf"))},
                   {"optim.0.step": torch.tensor(float("nan"))},
                   {"optim.1.step": torch.tensor(-3.0)}):
        caplog.clear()
        clf = OnlineClusterer.from_snapshot(_with_tensors(snap, **change), device="cpu")
        assert "fresh moments" in caplog.text and "1 parameter(s)" in caplog.text
        kept = [p for p in clf._parameters() if p in clf.optimizer_.state]
        assert len(kept) == len(list(clf._parameters())) - 1  # only the bad one starts afresh
        clf.partial_fit(X)  # raised FloatingPointError before
        assert np.isfinite(clf.centroids_.detach().numpy()).all()


def test_the_manifest_records_the_optimiser_that_trains(snap: Snapshot) -> None:
    clf = OnlineClusterer.from_snapshot(snap, device="cpu").set_params(lr=0.05, betas=(0.5, 0.6))
    m = clf.to_snapshot().manifest  # set_params does not move a built model's optimiser
    assert (m["lr"], m["betas"]) == (1e-3, [0.9, 0.99])


@pytest.mark.parametrize(
    ("regulariser", "params", "message"),
    [("ca", {"bogus": 1.0}, "unexpected keyword"),  # was a TypeError
     ("ent", {"lam": float("nan")}, "lam=nan is not a finite number"),  # a FloatingPointError
     ("sk", {"epsilon": 0.0}, "epsilon > 0"),  # trained silently to one cluster
     ("sk", {"n_iter": 0}, "n_iter >= 1")],
)
def test_bad_reg_params_are_value_errors(regulariser: str, params: dict, message: str) -> None:
    X = np.random.default_rng(0).normal(size=(32, 5)).astype("float32")
    with pytest.raises(ValueError, match=f"bad reg_params for regulariser '{regulariser}'|"
                                         f"{regulariser} needs") as info:
        OnlineClusterer(3, regulariser=regulariser, reg_params=params).partial_fit(X)
    assert message in str(info.value)


def test_bad_reg_params_in_a_snapshot_are_snapshot_errors(snap: Snapshot) -> None:
    hostile = Snapshot.create(snap.weights, {**snap.manifest, "reg_params": {"bogus": 1.0}})
    with pytest.raises(SnapshotError, match="bogus"):
        OnlineClusterer.from_snapshot(hostile, device="cpu")


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_a_served_snapshot_needs_a_positive_finite_sigma(snap: Snapshot, sigma: float) -> None:
    hostile = Snapshot.create(snap.weights, {**snap.manifest, "sigma": sigma})
    with pytest.raises(SnapshotError, match="sigma"):  # 0 was a ZeroDivisionError
        load(hostile)


def test_offset_state_is_read_strictly(snap: Snapshot) -> None:
    good = {"t:0": {"rows": 4}, "t:1": {"until": 9, "waiting": [[3, 5], [7, 8]]},
            "t:2": {"until": 30, "waiting": []}}  # a replay with all its waiting trained
    assert Manifest.from_dict({**snap.manifest, "offset_state": good}).offset_state == good
    for bad in ({"t:0": {"rows": -1}}, {"t:0": {"until": 9, "waiting": [[5, 5]]}},
                {"t:0": {"skip": 1}}, {"t:0": 3},
                # looked up by bisection: spans out of order or overlapping lost readings
                {"t:0": {"until": 99, "waiting": [[90, 91], [0, 1]]}},
                {"t:0": {"until": 99, "waiting": [[0, 5], [3, 8]]}},
                {"t:0": {"until": 9, "waiting": [[3, 12]]}}):
        with pytest.raises(SnapshotError, match="'offset_state' is bad"):
            Manifest.from_dict({**snap.manifest, "offset_state": bad})
