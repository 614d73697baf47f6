"""Loaded models, the holder and the snapshot watcher (directory store here; Redis elsewhere)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from oclust.model import OnlineClusterer, Snapshot
from oclust.model.snapshot import SnapshotError, pack_tensors, unpack_arrays
from oclust.service.app import create_app
from oclust.service.loader import LoadedModel, ModelHolder, SnapshotWatcher
from oclust.service.settings import ServiceSettings
from oclust.training_worker.store import StoreError, open_store


def _fit(shape: tuple[int, ...], seed: int = 0, k: int = 3, **kw: object) -> OnlineClusterer:
    rng = np.random.default_rng(seed)
    clf = OnlineClusterer(n_clusters=k, latent_dim=8, hidden=(16,), seed=seed, device="cpu", **kw)
    for _ in range(2):
        clf.partial_fit(rng.normal(size=(64, *shape)).astype("float32"))
    return clf


@pytest.mark.parametrize(
    ("shape", "kw", "backend"),
    [
        ((5,), {}, "compiled"),
        ((5,), {"regulariser": "cm"}, "compiled"),
        ((2, 12), {}, "torch"),
        ((6, 6), {"encoder": "cnn"}, "torch"),
    ],
)
def test_loaded_model_answers_as_the_clusterer(
    shape: tuple[int, ...], kw: dict[str, object], backend: str
) -> None:
    clf = _fit(shape, **kw)
    model = LoadedModel.from_snapshot(clf.to_snapshot())
    assert model.infer.backend == backend
    x = np.random.default_rng(9).normal(size=(16, *shape)).astype("float32") * 3
    labels, dists = clf.assign(x)
    soft = clf.soft_assign(x)
    batch = model.assign(x)
    assert batch.labels.tolist() == labels.tolist()
    np.testing.assert_allclose(batch.distances, dists, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(batch.soft, soft, rtol=1e-4, atol=1e-5)
    for i in range(len(x)):  # single samples (traced for torch)
        one = model.assign(x[i : i + 1])
        assert one.labels.tolist() == [labels[i]]
        np.testing.assert_allclose(one.distances, dists[i : i + 1], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(one.soft, soft[i : i + 1], rtol=1e-4, atol=1e-5)


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
    manifest = {k: v for k, v in good.manifest.items() if k not in ("sha256", "integrity")}
    bad_prior = Snapshot.create(good.weights, {**manifest, "prior": [1.0, 0.0]})
    with pytest.raises(SnapshotError, match="prior"):
        LoadedModel.from_snapshot(bad_prior)


@pytest.mark.parametrize("shape", [(5,), (2, 12)], ids=["compiled", "torch"])
def test_a_snapshot_with_nan_weights_is_never_made_nor_served(shape) -> None:
    clf = _fit(shape)
    good = clf.to_snapshot()
    with torch.no_grad():
        next(clf.encoder_.parameters())[0].fill_(float("nan"))
    with pytest.raises(SnapshotError, match="NaN, infinite or overflowing"):
        clf.to_snapshot()  # the worker never publishes such a model
    # one written by something else (an older build) is refused like a corrupt one
    tensors = {k: torch.from_numpy(v.copy()) for k, v in unpack_arrays(good.weights).items()}
    name = next(k for k in tensors if k.startswith("encoder.") and tensors[k].is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    manifest = {k: v for k, v in good.manifest.items() if k not in ("sha256", "integrity")}
    nan_snapshot = Snapshot.create(pack_tensors(tensors), manifest)
    with pytest.raises(SnapshotError, match=f"weight '{name}' holds NaN"):
        LoadedModel.from_snapshot(nan_snapshot)


def test_large_running_statistics_are_no_blown_up_weights() -> None:
    # the scaler's float64 sum of squared deviations passes 1.8e19 on valid, wide-ranged data:
    # only trained weights must stay below the bound where their squares overflow float32
    X = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)
    X[:, 0] *= 1e10
    clf = OnlineClusterer(n_clusters=3, latent_dim=8, seed=0, device="cpu").partial_fit(X)
    assert float(clf.scaler_.m2.max()) > 1e19
    model = LoadedModel.from_snapshot(clf.to_snapshot())
    assert model.assign(X).labels.tolist() == clf.predict(X).tolist()


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


def test_the_back_off_stays_capped_after_any_number_of_failures() -> None:
    watcher = SnapshotWatcher(None, ModelHolder(), retry_interval=2.0, max_retry_interval=30.0)
    pauses = {}
    for failures in (1, 2, 4, 5, 1025, 10**6):  # 2 ** 1024 overflowed and killed the thread
        watcher.failures = failures
        pauses[failures] = watcher.backoff()
    assert pauses == {1: 2.0, 2: 4.0, 4: 16.0, 5: 30.0, 1025: 30.0, 10**6: 30.0}


def _corrupt_newest(tmp_path: Path, namespace: str):
    """A store with two valid versions and a pointed third that fails its checksum."""
    store = open_store(f"file://{tmp_path}", namespace=namespace)
    store.publish(_fit((5,), seed=1).to_snapshot())
    store.publish(_fit((5,), seed=2).to_snapshot())
    snap = _fit((5,), seed=3).to_snapshot()
    store.publish(Snapshot(b"garbage", snap.manifest))
    return store


def _fail_once(monkeypatch: pytest.MonkeyPatch, store: object, method: str,
               when: Callable[..., bool] = lambda *args: True) -> list[tuple]:
    """Make the first call of ``store.method`` for which ``when(*args)`` holds raise a
    ``StoreError`` (an injected blip of the real store); returns the failed calls' args."""
    real, failed = getattr(store, method), []

    def flaky(*args: object) -> object:
        if not failed and when(*args):
            failed.append(args)
            raise StoreError("a blip")
        return real(*args)

    monkeypatch.setattr(store, method, flaky)
    return failed


def test_a_fresh_replica_retries_a_fallback_that_failed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _corrupt_newest(tmp_path, "f")
    _fail_once(monkeypatch, store, "versions")  # the listing fails once
    holder = ModelHolder()
    watcher = SnapshotWatcher(store, holder)
    assert watcher.check() is False and holder.current is None
    assert "snapshot 3 rejected" in holder.last_error and watcher.backoff() > 0
    assert watcher.check() is True  # the pointer has not moved, and the fallback is retried
    assert holder.current.version == 2 and "fallback" in holder.fallback


def test_a_store_error_during_the_fallback_never_settles_for_an_older_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _corrupt_newest(tmp_path, "o")
    failed = _fail_once(monkeypatch, store, "load", lambda version=None: version == 2)
    holder = ModelHolder()
    watcher = SnapshotWatcher(store, holder)
    assert watcher.check() is False and holder.current is None  # not version 1
    assert failed == [(2,)]
    assert watcher.check() is True and holder.current.version == 2


def test_the_watcher_thread_survives_an_unexpected_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(f"file://{tmp_path}", namespace="s")
    store.publish(_fit((5,)).to_snapshot())
    holder = ModelHolder()
    watcher = SnapshotWatcher(store, holder, poll_interval=0.05, retry_interval=0.05,
                              max_retry_interval=0.05)
    real = watcher.check
    raised = []

    def once(wait: float = 0.0) -> bool:
        if not raised:
            raised.append(1)
            raise RuntimeError("unforeseen")
        return real(wait)

    monkeypatch.setattr(watcher, "check", once)
    watcher.start()
    try:
        assert holder.wait_for_version(1, 10), "the watcher died on the first error"
    finally:
        watcher.stop()
    assert raised == [1]


def test_watcher_without_a_pointer_serves_the_newest_valid_version(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}", namespace="m")
    store.publish(_fit((5,), seed=1).to_snapshot())
    (store.path / "current").unlink()
    holder = ModelHolder()
    assert SnapshotWatcher(store, holder).check() is True
    assert holder.current.version == 1 and "no current-version pointer" in holder.fallback


def _get(app: object, path: str) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            return await client.get(path)

    return asyncio.run(go())


def test_a_serving_replica_says_when_it_cannot_load_the_pointed_version(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}", namespace="p")
    store.publish(_fit((5,), seed=1).to_snapshot())
    holder = ModelHolder()
    app = create_app(ServiceSettings(), holder)
    watcher = SnapshotWatcher(store, holder)
    assert watcher.check() is True and holder.fallback is None
    snap = _fit((5,), seed=2).to_snapshot()
    flipped = snap.weights[:-1] + bytes([snap.weights[-1] ^ 1])  # one weight byte flipped
    store.publish(Snapshot(flipped, snap.manifest))
    assert watcher.check() is False and holder.current.version == 1
    ready = _get(app, "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"  # it still serves
    assert ready.json()["version"] == 1 and "snapshot 2 rejected" in ready.json()["reason"]
    assert "pointed version 2 cannot be loaded" in ready.json()["fallback"]  # was None
    assert "oclust_snapshot_fallback 1.0" in _get(app, "/metrics").text  # was 0
    assert watcher.check() is False and holder.fallback is not None  # still not the pointed one
    store.rollback(1)  # back on the served snapshot: no swap, nothing left to report
    assert watcher.check() is False and holder.current.version == 1
    assert _get(app, "/readyz").json() == {"status": "ready", "reason": None, "version": 1,
                                           "fallback": None}
    assert "oclust_snapshot_fallback 0.0" in _get(app, "/metrics").text


def test_a_reset_store_whose_new_snapshot_reuses_the_version_number_is_loaded(
    tmp_path: Path,
) -> None:
    store = open_store(f"file://{tmp_path}", namespace="reset")
    a, b = _fit((5,), seed=1).to_snapshot(), _fit((5,), seed=2).to_snapshot()
    store.publish(a)
    holder = ModelHolder()
    watcher = SnapshotWatcher(store, holder)
    assert watcher.check() is True and holder.current.sha256 == a.sha256
    shutil.rmtree(store.path)  # the store is reset (a new directory, a flushed Redis)
    assert watcher.check() is False and holder.current.sha256 == a.sha256
    assert "no current-version pointer" in holder.fallback  # served, but pointed by nothing
    assert store.publish(b) == 1  # numbered from 1 again
    assert watcher.check() is True  # the old model was served forever
    assert (holder.current.version, holder.current.sha256) == (1, b.sha256)
    assert holder.fallback is None and holder.last_error is None
    seen: list[int] = []
    holder.subscribe(lambda m: seen.append(m.version))
    (store.path / "current").unlink()
    assert watcher.check() is False and holder.fallback is not None
    store.rollback(1)  # the pointer comes back to the served snapshot: nothing to swap
    assert watcher.check() is False and holder.fallback is None and seen == [1]


_SERVE = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps({"modules": sorted(
    m for m in ("torch", "sklearn", "numba") if m in sys.modules)}), flush=True))
from oclust.service.cli import app
app(sys.argv[1:], prog_name="oclust")
"""


def test_a_replica_serving_an_mlp_snapshot_never_imports_torch(tmp_path: Path) -> None:
    """The real ``oclust serve`` on a directory store: answers as the clusterer, no torch."""
    import contextlib
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    clf = _fit((5,), regulariser="cm")
    open_store(f"file://{tmp_path}", namespace="r").publish(clf.to_snapshot())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _SERVE, "serve", "--store", f"file://{tmp_path}",
           "--namespace", "r", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, text=True)
    x = np.random.default_rng(5).normal(size=(8, 5)).astype("float32")

    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    try:
        for _ in range(600):  # the process is external: poll its readiness endpoint
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert proc.poll() is None, "oclust serve exited"
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.1)
        want = clf.predict(x).tolist()
        assert post("/assign/batch", {"items": x.tolist()})["clusters"] == want
        assert [post("/assign", {"features": row})["cluster"] for row in x.tolist()] == want
        assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down, then re-raises it: atexit runs
        out, _ = proc.communicate(timeout=20)
    modules = json.loads(out.strip().splitlines()[-1])["modules"]
    assert modules == ["numba"]  # neither torch nor scikit-learn


def test_serve_and_up_build_the_watcher_from_every_watcher_setting(tmp_path: Path) -> None:
    import inspect

    from oclust.service import cmd_serve, cmd_up
    from oclust.service.settings import ServiceSettings

    s = ServiceSettings(poll_interval=0.2, retry_interval=0.5, max_retry_interval=4.0,
                        torch_threads=2, device="cpu")
    w = SnapshotWatcher.for_settings(open_store(f"file://{tmp_path}", "s"), ModelHolder(), s)
    assert (w.poll_interval, w.retry_interval, w.max_retry_interval, w.torch_threads,
            w.device) == (0.2, 0.5, 4.0, 2, "cpu")
    for module in (cmd_serve, cmd_up):  # up ignored the retry intervals, threads and device
        assert "SnapshotWatcher.for_settings(" in inspect.getsource(module)
        assert "SnapshotWatcher(" not in inspect.getsource(module)
