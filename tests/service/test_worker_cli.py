"""``oclust train``, ``oclust produce`` and ``oclust worker`` command lines (real broker)."""

from __future__ import annotations

import asyncio
import json
import pickle

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from typer.testing import CliRunner

from oclust.model import OnlineClusterer, datasets
from oclust.model.snapshot import SAMPLE_INPUTS, unpack_arrays
from oclust.service.cli import app
from oclust.training_worker.monitor import InputReservoir
from oclust.training_worker.store import open_store

runner = CliRunner()


def _text(output: str) -> str:
    """CLI output with rich's box borders and line wrapping removed."""
    return " ".join(output.replace("│", " ").split())


def _consume(bootstrap: str, topic: str, n: int) -> list:
    async def main() -> list:
        c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False)
        await c.start()
        got: list = []
        try:
            while len(got) < n:
                batch = await c.getmany(timeout_ms=5000)
                assert batch, f"only {len(got)} of {n} messages arrived"
                got += [m for msgs in batch.values() for m in msgs]
        finally:
            await c.stop()
        return got

    return asyncio.run(main())


def test_train_dataset_publishes_a_servable_snapshot(tmp_path):
    store = f"file://{tmp_path}"
    result = runner.invoke(app, ["train", "--dataset", "digits", "--store", store,
                                 "--namespace", "d", "--n-clusters", "10", "--epochs", "2",
                                 "--latent-dim", "16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "published version 1" in result.output
    snap = open_store(store, "d").load()
    assert snap.manifest["offsets"] == {}
    assert snap.manifest["samples_seen"] == 2 * 1797
    assert snap.manifest["metrics"]["acc"] > 0.3  # far better than chance (0.1)
    X, _ = datasets.load("digits")
    assert OnlineClusterer.from_snapshot(snap, device="cpu").predict(X).shape == (1797,)
    # a random sample of the digits is stored with it for a resumed worker's snapshot judge
    stored = unpack_arrays(snap.weights)[SAMPLE_INPUTS]
    assert stored.shape == (1024, 64)
    rows = {r.tobytes() for r in X.reshape(len(X), -1).astype(np.float32)}
    assert all(r.tobytes() in rows for r in stored) and len(np.unique(stored, axis=0)) > 900
    reservoir = InputReservoir(rows=1024)
    assert reservoir.resume_from(snap, (64,)) is None and len(reservoir) == 1024
    result = runner.invoke(app, ["train", "--dataset", "digits", "--store", store, "--namespace",
                                 "d", "--epochs", "1", "--latent-dim", "8", "--no-store-sample"])
    assert result.exit_code == 0, result.output
    assert SAMPLE_INPUTS not in unpack_arrays(open_store(store, "d").load().weights)


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_train_from_file(tmp_path, suffix):
    X = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    path = tmp_path / f"data{suffix}"
    if suffix == ".npy":
        np.save(path, X)
    else:
        path.write_text("a,b,c,d,e\n" + "\n".join(",".join(map(str, r)) for r in X))
    result = runner.invoke(app, ["train", "--input", str(path), "--store", f"file://{tmp_path}",
                                 "--n-clusters", "3", "--epochs", "1", "--latent-dim", "8"])
    assert result.exit_code == 0, result.output
    snap = open_store(f"file://{tmp_path}", "oclust").load()
    assert snap.manifest["input_shape"] == [5] and snap.manifest["samples_seen"] == 300


def test_train_daphnet_windows(tmp_path):
    # a reading stream: windows of 64 readings (as oclust up cuts them) and K = 2 by default
    result = runner.invoke(app, ["train", "--dataset", "daphnet", "--store", f"file://{tmp_path}",
                                 "--epochs", "1", "--latent-dim", "8"])
    assert result.exit_code == 0, result.output
    manifest = open_store(f"file://{tmp_path}", "oclust").load().manifest
    assert manifest["input_shape"] == [9, 64] and manifest["n_clusters"] == 2


def test_train_defaults_k_to_the_datasets_classes(tmp_path, monkeypatch):
    store = f"file://{tmp_path}"
    args = ["train", "--dataset", "segments", "--store", store, "--epochs", "1",
            "--latent-dim", "8"]
    assert runner.invoke(app, [*args, "--namespace", "a"]).exit_code == 0
    assert open_store(store, "a").load().manifest["n_clusters"] == 7  # segments' classes
    monkeypatch.setenv("OCLUST_N_CLUSTERS", "3")  # a K given anywhere wins
    assert runner.invoke(app, [*args, "--namespace", "b"]).exit_code == 0
    assert open_store(store, "b").load().manifest["n_clusters"] == 3


def test_train_checks_a_prior_against_the_datasets_k(tmp_path):
    # K comes from the dataset when not given (basic_motions: 4): the prior was checked
    # against the settings' default K = 10, refusing 4 values and taking 10 (then exit 1)
    store = f"file://{tmp_path}"
    args = ["train", "--dataset", "basic_motions", "--store", store, "--epochs", "1",
            "--latent-dim", "8"]
    result = runner.invoke(app, [*args, "--prior", ",".join(["0.1"] * 10)])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1, result.output  # before loading or training
    assert "Invalid value for '--prior': prior must be a vector of length n_clusters=4" \
        in _text(result.output)
    result = runner.invoke(app, [*args, "--prior", "0.4,0.2,0.2,0.2"])
    assert result.exit_code == 0, result.output
    manifest = open_store(store, "oclust").load().manifest
    assert manifest["n_clusters"] == 4


def test_train_rejects_bad_input(tmp_path):
    bad = tmp_path / "obj.npy"
    bad.write_bytes(pickle.dumps({"not": "an array"}))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "huge.npy", np.full((100, 4), 1e30, np.float32))  # trained, then crashed
    np.save(tmp_path / "one.npy", np.ones((1, 4), np.float32))
    np.save(tmp_path / "none.npy", np.ones((5, 0), np.float32))  # was numpy's reduction error
    np.save(tmp_path / "readings.npy", np.ones((500, 3), np.float32))
    cases = [
        (["--input", str(tmp_path / "none.npy")], "expected N samples × features"),
        (["--input", str(tmp_path / "huge.npy")], "beyond ±1e+06"),
        (["--input", str(tmp_path / "missing.npy")], "does not exist"),
        (["--input", str(tmp_path / "objects.npy")], "not a plain numeric"),
        (["--dataset", "digits", "--input", str(bad)], "exactly one"),
        ([], "exactly one"),
        (["--dataset", "nope"], "unknown dataset"),
        (["--dataset", "digits", "--window-size", "8"], "digits loads as samples"),
        (["--dataset", "hapt", "--window-hop", "8"], "hapt loads as samples"),
        (["--dataset", "nope", "--window-size", "8"], "unknown dataset"),
        (["--input", str(tmp_path / "one.npy")], "3 clusters for 1 samples"),  # was published
        # a hop without a size was ignored: 500 samples of 3 features trained, no windows
        (["--input", str(tmp_path / "readings.npy"), "--window-hop", "8"],
         "'--window-hop': needs --window-size"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["train", *args, "--n-clusters", "3",
                                     "--store", f"file://{tmp_path}"])
        assert result.exit_code == 2, (args, result.output)
        assert message in _text(result.output), (args, result.output)
    assert not (tmp_path / "oclust").exists()  # bad input leaves no empty store behind


def test_produce_streams_a_dataset_with_labels(kafka_bootstrap, unique_topic):
    result = runner.invoke(app, ["produce", "--dataset", "digits", "--topic", unique_topic,
                                 "--bootstrap-servers", kafka_bootstrap, "--limit", "50"])
    assert result.exit_code == 0, result.output
    msgs = _consume(kafka_bootstrap, unique_topic, 50)
    X, y = datasets.load("digits")
    first = json.loads(msgs[0].value)
    assert first["features"] == X[0].tolist() and first["label"] == int(y[0])
    assert [json.loads(m.value)["id"] for m in msgs] == [f"digits-{i}" for i in range(50)]


def test_produce_binary_and_loop(kafka_bootstrap, unique_topic):
    result = runner.invoke(app, ["produce", "--dataset", "segments", "--topic", unique_topic,
                                 "--bootstrap-servers", kafka_bootstrap, "--limit", "2400",
                                 "--loop", "--binary", "--quiet"])
    assert result.exit_code == 0, result.output
    msgs = _consume(kafka_bootstrap, unique_topic, 2400)
    X, y = datasets.load("segments")
    assert len(msgs) == 2400  # 2310 rows, then around again
    last = msgs[-1]
    np.testing.assert_array_equal(np.frombuffer(last.value, "<f4"), X[2399 - 2310])
    assert dict(last.headers)["label"] == str(int(y[2399 - 2310])).encode()


def test_produce_unknown_dataset_is_a_clear_error(kafka_bootstrap):
    result = runner.invoke(app, ["produce", "--dataset", "mnist", "--topic", "x",
                                 "--bootstrap-servers", kafka_bootstrap])
    assert result.exit_code == 2
    assert "unknown dataset" in _text(result.output)


def test_produce_blames_dataset_only_for_the_datasets_own_errors(monkeypatch):
    # every ValueError of the replay was "Invalid value for --dataset"
    from oclust.training_worker import producer

    async def replay(*_args, **_kwargs):
        raise ValueError("something else broke")

    monkeypatch.setattr(producer, "replay", replay)
    result = runner.invoke(app, ["produce", "--dataset", "digits", "--topic", "x",
                                 "--bootstrap-servers", "127.0.0.1:1"])
    assert result.exit_code == 1, result.output
    assert result.output == "error: something else broke\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--batch-size", "0"], "'--batch-size'"), (["--mode", "images"], "'--mode'"),
     (["--store", "ftp://x"], "unknown store URL scheme"),
     (["--regulariser", "bogus"], "unknown regulariser 'bogus'"),
     (["--prior", "0.5,0.5"], "length n_clusters=10"),
     (["--log-level", "loud"], "'--log-level'"), (["--no-such-option"], "No such option")],
)
def test_worker_rejects_bad_settings(args, message, tmp_path):
    # Caught before any work: an unreachable broker would otherwise be the error (exit 1).
    result = runner.invoke(app, ["worker", "--metrics-port", "-1", "--bootstrap-servers",
                                 "127.0.0.1:1", *args])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("oclust worker: error:")
    assert message in result.output


def test_worker_without_kafka_fails_clearly(tmp_path):
    result = runner.invoke(app, ["worker", "--metrics-port", "-1", "--bootstrap-servers",
                                 "127.0.0.1:1", "--store", f"file://{tmp_path}"])
    assert result.exit_code == 1
    assert "Kafka at 127.0.0.1:1" in _text(result.output)


def test_worker_with_an_unwritable_directory_store_fails_at_once(tmp_path):
    # it waited for the store forever, logging "retrying", as for a Redis not up yet
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["worker", "--metrics-port", "-1", "--bootstrap-servers",
                                 "127.0.0.1:1", "--store", f"file://{tmp_path}/file/store"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot use the store"), result.output


@pytest.mark.parametrize("process", ["--train-process", "--no-train-process"])
def test_worker_with_a_blown_up_model_exits_1_with_one_error_line(
    kafka_bootstrap, unique_topic, tmp_path, process
):
    import asyncio

    from oclust.training_worker.producer import replay

    asyncio.run(replay(kafka_bootstrap, unique_topic, "digits", limit=640, progress=False))
    result = runner.invoke(app, [
        "worker", "--metrics-port", "-1", "--bootstrap-servers", kafka_bootstrap,
        "--topic", unique_topic, "--store", f"file://{tmp_path}", "--n-clusters", "10",
        "--batch-size", "64", "--snapshot-interval", "0", "--lr", "1e30", process,
        "--session-timeout-ms", "1000",
        "--log-level", "error",
    ])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "weights up to NaN" in errors[0], result.output
    assert not isinstance(result.exception, FloatingPointError)  # caught, not a traceback
    assert open_store(f"file://{tmp_path}", "oclust").versions() == []


def test_train_refuses_a_model_it_cannot_build_before_training_or_touching_the_store(tmp_path):
    # a latent of 2 under the LayerNorm latents of vectors failed at the first batch: exit 1
    store = tmp_path / "store"
    for extra, option in ((["--latent-dim", "2"], "'--latent-dim'"),
                          (["--regulariser", "sk", "--input-guide", "5"], "'--input-guide'")):
        result = runner.invoke(app, ["train", "--dataset", "digits", "--store",
                                     f"file://{store}", *extra])
        assert result.exit_code == 2, result.output
        assert f"Invalid value for {option}" in result.output, result.output
        assert "train" not in result.output.split("Invalid value")[1]  # no progress bar
    assert not store.exists()  # refused before the store check makes it
