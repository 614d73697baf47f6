"""``oclust snapshots list|show|rollback`` against a real redis-server, and ``oclust serve``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from oclust.model import OnlineClusterer, Snapshot
from oclust.service.cli import app
from oclust.training_worker.store import open_store

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _snapshot(seed: int) -> Snapshot:
    rng = np.random.default_rng(seed)
    clf = OnlineClusterer(n_clusters=3, latent_dim=8, hidden=(16,), seed=seed, device="cpu")
    clf.partial_fit(rng.normal(size=(64, 5)).astype("float32"))
    return clf.to_snapshot(metrics={"loss": 0.25})


@pytest.fixture
def store_url(redis_url: str) -> str:
    store = open_store(redis_url, namespace="cli")
    store.publish(_snapshot(0))
    store.publish(_snapshot(1))
    store.close()
    return redis_url


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.output


def test_list_shows_every_version_and_the_current_one(store_url: str) -> None:
    code, out = _run("snapshots", "list", "--store", store_url, "--namespace", "cli")
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.strip().startswith("│")]
    v1 = next(r for r in rows if r.split("│")[1].strip() == "1")
    v2 = next(r for r in rows if r.split("│")[1].strip() == "2")
    assert "*" not in v1 and "*" in v2
    assert "ca" in v2 and "0.250" in v2


def test_list_reads_the_store_from_the_environment(store_url: str) -> None:
    env = {"OCLUST_STORE": store_url, "OCLUST_NAMESPACE": "cli"}
    code, out = _run("snapshots", "list", env=env)
    assert code == 0 and "namespace 'cli'" in out


def test_list_of_an_empty_namespace(store_url: str) -> None:
    code, out = _run("snapshots", "list", "--store", store_url, "--namespace", "empty")
    assert code == 0 and "no snapshots" in out


def test_show_prints_the_manifest(store_url: str) -> None:
    code, out = _run("snapshots", "show", "--store", store_url, "--namespace", "cli")
    assert code == 0, out
    manifest = json.loads(out)
    assert manifest["version"] == 2 and manifest["metrics"] == {"loss": 0.25}
    code, out = _run("snapshots", "show", "1", "--store", store_url, "--namespace", "cli")
    assert code == 0 and json.loads(out)["version"] == 1


def test_rollback_moves_current_and_announces(store_url: str) -> None:
    store = open_store(store_url, namespace="cli")
    pubsub = store.client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("cli:events")
    code, out = _run("snapshots", "rollback", "1", "--store", store_url, "--namespace", "cli")
    assert code == 0, out
    assert "current version: 1 (was 2)" in out
    assert store.current_version() == 1
    deadline = time.monotonic() + 5
    notice = None
    while notice is None and time.monotonic() < deadline:  # skips the subscribe confirmation
        notice = pubsub.get_message(timeout=1)
    assert notice is not None and json.loads(notice["data"]) == {"version": 1, "rollback": True}
    pubsub.close()
    store.close()


def test_missing_versions_and_bad_stores_are_clear_errors(store_url: str) -> None:
    code, out = _run("snapshots", "show", "99", "--store", store_url, "--namespace", "cli")
    assert code == 1 and "not stored" in out
    code, out = _run("snapshots", "rollback", "99", "--store", store_url, "--namespace", "cli")
    assert code == 1 and "not stored" in out
    assert open_store(store_url, namespace="cli").current_version() == 2
    code, out = _run("snapshots", "list", "--store", "ftp://x", "--namespace", "cli")
    assert code == 2 and "unknown store URL scheme" in out
    code, out = _run("snapshots", "list", "--store", "redis://127.0.0.1:1/0")
    assert code == 1 and "failed while" in out


def test_list_and_show_json(store_url: str) -> None:
    code, out = _run("snapshots", "list", "--json", "--store", store_url, "--namespace", "cli")
    assert code == 0, out
    inv = json.loads(out)
    assert inv["current"] == 2 and inv["pointer_problem"] is None
    assert [(r["version"], r["current"], r["valid"]) for r in inv["versions"]] == [
        (1, False, True), (2, True, True)]
    assert inv["versions"][1]["manifest"]["metrics"] == {"loss": 0.25}
    code, out = _run("snapshots", "show", "1", "--json", "--store", store_url, "--namespace",
                     "cli")
    assert code == 0 and json.loads(out)["version"] == 1


@pytest.mark.parametrize("pointer", [b"abc", b"", b"-3", None, b"7"])
def test_any_pointer_state_is_shown_and_repaired(store_url: str, pointer: bytes | None) -> None:
    store = open_store(store_url, namespace="cli")
    if pointer is None:
        store.client.delete("cli:current")
    else:
        store.client.set("cli:current", pointer)
    args = ("--store", store_url, "--namespace", "cli")
    code, out = _run("snapshots", "list", "--json", *args)
    assert code == 0, out
    inv = json.loads(out)
    assert [r["version"] for r in inv["versions"]] == [1, 2]
    assert (inv["pointer_problem"] is None) == (pointer is None)
    code, out = _run("snapshots", "list", *args)
    assert code == 0 and "│" in out  # the table still lists both versions
    if pointer is not None and pointer != b"7":
        code, out = _run("snapshots", "show", *args)
        assert code == 1 and "rollback" in out
    code, out = _run("snapshots", "rollback", "1", *args)
    assert code == 0, out
    assert store.current_version() == 1
    assert json.loads(_run("snapshots", "show", "--json", *args)[1])["version"] == 1
    store.close()


def test_corrupt_versions_are_listed_and_refused_as_rollback_targets(store_url: str) -> None:
    store = open_store(store_url, namespace="cli")
    manifest = json.loads(store.client.get("cli:manifest:1"))
    store.client.set("cli:manifest:1", json.dumps({**manifest, "standardize": False}))
    args = ("--store", store_url, "--namespace", "cli")
    inv = json.loads(_run("snapshots", "list", "--json", *args)[1])
    assert inv["versions"][0]["valid"] is False and "integrity" in inv["versions"][0]["error"]
    code, out = _run("snapshots", "rollback", "1", *args)
    assert code == 1 and "integrity" in out and store.current_version() == 2
    store.close()


def test_a_deeply_nested_manifest_is_listed_as_corrupt(store_url: str) -> None:
    store = open_store(store_url, namespace="cli")
    store.client.set("cli:manifest:1", b"[" * 100000)  # json.loads: a RecursionError
    args = ("--store", store_url, "--namespace", "cli")
    code, out = _run("snapshots", "list", "--json", *args)
    assert code == 0, out
    row = json.loads(out)["versions"][0]
    assert row["valid"] is False and "nested too deeply" in row["error"]
    code, out = _run("snapshots", "list", *args)
    assert code == 0 and "corrupt" in out
    for command in ("show", "rollback"):
        code, out = _run("snapshots", command, "1", *args)
        assert code == 1 and out.startswith("error: manifest is not JSON"), out
    assert store.current_version() == 2
    store.close()


def test_serve_runs_the_service_from_a_store(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}", namespace="srv")
    store.publish(_snapshot(0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OCLUST_API_KEY": "k3y", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "oclust", "serve", "--store", f"file://{tmp_path}",
           "--namespace", "srv", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # a separate process: polling its readiness endpoint is the only signal
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "serve did not become ready"
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        payload = {"features": [0.0, 1.0, 2.0, 3.0, 4.0]}
        assert httpx.post(url + "/assign", json=payload).status_code == 401
        r = httpx.post(url + "/assign", json=payload, headers={"X-API-Key": "k3y"})
        assert r.status_code == 200 and r.json()["version"] == 1
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    assert "Traceback" not in err


def test_serve_rejects_bad_settings() -> None:
    code, out = _run("serve", "--max-batch", "0")
    assert code == 2 and "'--max-batch'" in out and out.count("\n") == 1
