"""Loaded models, the holder and the snapshot watcher (directory store here; Redis elsewhere)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import OnlineClusterer, Snapshot
from model.snapshot import SnapshotError, pack_tensors
from service.loader import LoadedModel, ModelHolder, NearestCentroid, SnapshotWatcher, _trace
from training_worker.store import open_store


def _fit(shape: tuple[int, ...], seed: int = 0, k: int = 3, **kw: object) -> OnlineClusterer:
    rng = np.random.default_rng(seed)
    clf = OnlineClusterer(n_clusters=k, latent_dim=8, hidden=(16,), seed=seed, device="cpu", **kw)
    for _ in range(2):
        clf.partial_fit(rng.normal(size=(64, *shape)).astype("float32"))
    return clf


@pytest.mark.parametrize(
    ("shape", "kw", "path"),
    [
        ((5,), {}, "compiled"),
        ((5,), {"standardize": False}, "compiled"),
        ((5,), {"latent_norm": "batch"}, "compiled"),
        ((5,), {"latent_norm": "none"}, "compiled"),
        ((2, 12), {}, "traced"),
        ((6, 6), {"encoder": "cnn"}, "traced"),
    ],
)
@pytest.mark.parametrize("fast", [True, False])
def test_nearest_centroid_matches_the_clusterer(
    shape: tuple[int, ...], kw: dict[str, object], path: str, fast: bool
) -> None:
    clf = _fit(shape, **kw)
    nc = NearestCentroid.from_clusterer(OnlineClusterer.from_snapshot(clf.to_snapshot()), fast)
    assert nc.single_path == (path if fast else "eager")
    x = np.random.default_rng(9).normal(size=(16, *shape)).astype("float32") * 3
    labels, dists = clf.assign(x)
    soft = clf.soft_assign(x)
    batch = nc(x)
    assert batch.labels.tolist() == labels.tolist()
    np.testing.assert_allclose(batch.distances, dists, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(batch.soft, soft, rtol=1e-4, atol=1e-6)
    for i in range(len(x)):  # the single-sample path (traced when available)
        one = nc(x[i : i + 1])
        assert one.labels.tolist() == [labels[i]]
        np.testing.assert_allclose(one.distances, dists[i : i + 1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(one.soft, soft[i : i + 1], rtol=1e-4, atol=1e-6)


def test_traced_path_runs_without_a_grad_context() -> None:
    clf = _fit((2, 12))
    pipeline = NearestCentroid.from_clusterer(clf, fast=False).pipeline
    traced = _trace(pipeline, (2, 12), clf.device_)
    assert traced is not None
    x = np.random.default_rng(0).normal(size=(1, 2, 12)).astype(np.float32)
    labels, dist, soft = traced(x)  # called outside inference mode, as the service does
    with torch.inference_mode():
        want = pipeline(torch.from_numpy(x))
    assert labels.tolist() == want[0].tolist()
    np.testing.assert_allclose(dist, want[1].numpy(), rtol=1e-5)
    np.testing.assert_allclose(soft, want[2].numpy(), rtol=1e-5)


def test_loaded_model_is_read_only() -> None:
    snap = _fit((5,)).to_snapshot().with_version(4)
    model = LoadedModel.from_snapshot(snap)
    assert (model.version, model.n_clusters, model.input_shape, model.input_size) == (4, 3, (5,), 5)
    assert model.sha256 == snap.sha256 and model.created_at == snap.manifest["created_at"]
    with pytest.raises(TypeError):
        model.manifest["version"] = 5  # type: ignore[index]
    with pytest.raises(ValueError, match="read-only"):
        model.prior[0] = 1.0
    with pytest.raises(AttributeError):
        model.version = 5  # type: ignore[misc]


def test_bad_snapshots_are_refused() -> None:
    good = _fit((5,)).to_snapshot()
    with pytest.raises(SnapshotError, match="sha256"):
        LoadedModel.from_snapshot(Snapshot(good.weights + b"x", good.manifest))
    unfit = Snapshot.create(pack_tensors({"centroids": torch.zeros(2, 3)}), {"n_clusters": 2})
    with pytest.raises(SnapshotError):
        LoadedModel.from_snapshot(unfit)


def test_holder_tells_listeners_before_swapping() -> None:
    holder = ModelHolder()
    seen: list[tuple[int, int | None]] = []
    holder.subscribe(lambda m: seen.append((m.version, getattr(holder.current, "version", None))))
    snap = _fit((5,)).to_snapshot()
    holder.swap(LoadedModel.from_snapshot(snap.with_version(1)))
    holder.swap(LoadedModel.from_snapshot(snap.with_version(2)))
    assert seen == [(1, None), (2, 1)]
    late: list[int] = []
    holder.subscribe(lambda m: late.append(m.version))  # told about the current one at once
    assert late == [2]
    assert holder.wait_for_version(2, 0) and not holder.wait_for_version(3, 0.01)


def test_not_ready_reason_explains() -> None:
    holder = ModelHolder()
    assert holder.not_ready_reason() == "no snapshot loaded yet"
    holder.store_up = False
    holder.last_error = "connection refused"
    assert holder.not_ready_reason() == (
        "no snapshot loaded yet; the snapshot store is unreachable: connection refused"
    )


def test_watcher_loads_skips_corrupt_and_recovers(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}", namespace="w")
    holder = ModelHolder()
    watcher = SnapshotWatcher(store, holder)
    assert watcher.check() is False and holder.current is None and holder.store_up is True
    assert holder.last_error == "no snapshot published yet in the store"
    a, b = _fit((5,), seed=1).to_snapshot(), _fit((5,), seed=2, k=4).to_snapshot()
    store.publish(a)
    assert watcher.check() is True and holder.current.version == 1
    assert watcher.check() is False  # nothing new
    store.publish(Snapshot(b"garbage", b.manifest))  # checksum mismatch
    assert watcher.check() is False and holder.current.version == 1
    assert "snapshot 2 rejected" in holder.last_error
    assert watcher.check() is False  # not retried until the pointer moves
    store.publish(b)
    assert watcher.check() is True and holder.current.version == 3
    assert holder.current.n_clusters == 4 and holder.last_error is None


def test_watcher_reports_an_unreachable_store() -> None:
    store = open_store("redis://127.0.0.1:1/0", namespace="w", socket_timeout=0.5)
    holder = ModelHolder()
    assert SnapshotWatcher(store, holder).check() is False
    assert holder.store_up is False and "Redis at redis://127.0.0.1:1/0" in holder.last_error
    assert "unreachable" in holder.not_ready_reason()


def test_watcher_thread_starts_and_stops(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}", namespace="t")
    store.publish(_fit((5,)).to_snapshot())
    holder = ModelHolder()
    watcher = SnapshotWatcher(store, holder, poll_interval=0.05)
    watcher.start()
    watcher.start()  # idempotent
    try:
        assert holder.wait_for_version(1, 10)
        store.publish(_fit((5,), seed=3).to_snapshot())
        assert holder.wait_for_version(2, 5)
    finally:
        watcher.stop()
    assert watcher._thread is None


@settings(max_examples=30, deadline=None)
@given(
    layers=st.lists(st.sampled_from(["linear", "relu", "layernorm", "batchnorm"]), max_size=5),
    width=st.integers(1, 9),
    k=st.integers(1, 5),
    scale=st.sampled_from([0.01, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_compiled_single_path_equals_torch(
    layers: list[str], width: int, k: int, scale: float, seed: int
) -> None:
    from torch import nn

    from service.fastpath import compile_single

    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Linear(4, width)]
    for name in layers:
        if name == "linear":
            mods.append(nn.Linear(width, width))
        elif name == "relu":
            mods.append(nn.ReLU())
        elif name == "layernorm":
            mods.append(nn.LayerNorm(width))
        else:
            bn = nn.BatchNorm1d(width).eval()
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            mods.append(bn)
    enc = nn.Sequential(*mods).eval()
    centroids = torch.randn(k, width)
    fn = compile_single(nn.Identity(), enc, centroids, sigma=1.0, input_shape=(4,))
    assert fn is not None
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed)) * scale
    with torch.no_grad():
        d = torch.cdist(enc(x), centroids) ** 2
    labels, dist, soft = fn(x.numpy())
    np.testing.assert_allclose(dist, d.min(dim=1).values.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(soft, torch.softmax(-0.5 * d, dim=1).numpy(), rtol=1e-3, atol=1e-5)
    close = d.numpy()[np.arange(3), labels] <= d.min(dim=1).values.numpy() + 1e-4
    assert close.all()  # the chosen centroid is a nearest one (ties within rounding)


def test_compiled_single_path_turns_overflow_into_nan() -> None:
    from torch import nn

    from service.fastpath import compile_single

    enc = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    fn = compile_single(nn.Identity(), enc, torch.randn(2, 4), sigma=1.0, input_shape=(3,))
    assert fn is not None
    labels, dist, _ = fn(np.full((1, 3), 3e38, np.float32))
    assert labels.tolist() in ([0], [1]) and np.isnan(dist).all()


def test_watcher_backs_off_on_a_garbled_pointer_and_falls_back(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}", namespace="g")
    store.publish(_fit((5,), seed=1).to_snapshot())
    store.publish(_fit((5,), seed=2).to_snapshot())
    (store.path / "current").write_text("abc")
    holder = ModelHolder()
    watcher = SnapshotWatcher(store, holder, retry_interval=0.5, max_retry_interval=3.0)
    assert watcher.backoff() == 0.0
    assert watcher.check() is True  # nothing served yet: the newest valid version instead
    assert holder.current.version == 2 and "fallback" in holder.fallback
    assert "not a version number" in holder.last_error and holder.store_up is True
    pauses = []
    for _ in range(5):
        assert watcher.check() is False and holder.current.version == 2
        pauses.append(watcher.backoff())
    assert pauses == [0.5, 1.0, 2.0, 3.0, 3.0]  # exponential, capped
    store.rollback(1)  # the repair
    assert watcher.check() is True and holder.current.version == 1
    assert holder.fallback is None and holder.last_error is None and watcher.backoff() == 0.0


def test_watcher_without_a_pointer_serves_the_newest_valid_version(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}", namespace="m")
    store.publish(_fit((5,), seed=1).to_snapshot())
    (store.path / "current").unlink()
    holder = ModelHolder()
    assert SnapshotWatcher(store, holder).check() is True
    assert holder.current.version == 1 and "no current-version pointer" in holder.fallback
