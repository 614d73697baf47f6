"""Hot reload through a real redis-server and a real uvicorn server, under concurrent load."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from pytest_redis import factories

from oclust.model import OnlineClusterer, Snapshot
from oclust.service.app import create_app
from oclust.service.loader import ModelHolder, SnapshotWatcher
from oclust.service.settings import ServiceSettings
from oclust.training_worker.store import SnapshotStore, open_store

outage_redis = factories.redis_proc(port=None)  # a server of our own, to stop and restart

FEATURES = [0.5, -1.0, 2.0, 0.0, 1.5]


def _snapshot(seed: int, k: int = 3) -> Snapshot:
    rng = np.random.default_rng(seed)
    clf = OnlineClusterer(n_clusters=k, latent_dim=8, hidden=(16,), seed=seed, device="cpu")
    for _ in range(2):
        clf.partial_fit(rng.normal(size=(64, 5)).astype("float32"))
    return clf.to_snapshot()


@pytest.fixture(scope="module")
def snapshots() -> list[Snapshot]:
    return [_snapshot(seed, k) for seed, k in ((0, 3), (1, 4), (2, 3), (3, 5))]


class Server:
    """uvicorn serving ``app`` in a thread on a free port (lifespan on: starts the watcher).

    ``config``: a uvicorn configuration of ``app`` (e.g. ``oclust serve``'s); default plain.
    """

    def __init__(self, app: object, config: uvicorn.Config | None = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = config or uvicorn.Config(app)
        config.log_level, config.lifespan = "warning", "on"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:  # uvicorn offers a flag, not an event
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@contextmanager
def serving(store: SnapshotStore, **overrides: object) -> Iterator[tuple[Server, ModelHolder]]:
    holder = ModelHolder()
    watcher = SnapshotWatcher(store, holder, poll_interval=0.5, retry_interval=0.1)
    app = create_app(ServiceSettings(**overrides), holder, background=[watcher])
    with Server(app) as server:
        yield server, holder


class Load:
    """Clients hammering POST /assign from threads; every answer is recorded."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.stop = threading.Event()
        self.answered = threading.Condition()
        self.answers: list[list[tuple[float, int, int | None]]] = [[] for _ in range(clients)]
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while not self.stop.is_set():
                r = client.post("/assign", json={"features": FEATURES})
                version = r.json().get("version") if r.status_code == 200 else None
                with self.answered:
                    self.answers[i].append((time.monotonic(), r.status_code, version))
                    self.answered.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        with self.answered:
            assert self.answered.wait_for(predicate, timeout), "clients stalled"

    def first_seen(self, version: int) -> float:
        return min(t for a in self.answers for t, _, v in a if v == version)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def test_new_snapshot_is_served_within_a_second_without_errors(
    redis_url: str, snapshots: list[Snapshot]
) -> None:
    store = open_store(redis_url, namespace="reload")
    store.publish(snapshots[0])
    with serving(store) as (server, holder):
        assert holder.wait_for_version(1, 10)
        with Load(server.url) as load:
            published = {}
            for snap in snapshots[1:]:
                # wait until every client has been answered since the last swap, then publish
                marks = [len(a) for a in load.answers]
                load.wait(lambda m=marks: all(
                    len(a) >= n + 3 for a, n in zip(load.answers, m, strict=True)))
                t0 = time.monotonic()
                version = store.publish(snap)
                published[version] = t0
                assert holder.wait_for_version(version, 5)
            final = max(published)
            load.wait(lambda: all(a and a[-1][2] == final for a in load.answers))
    store.close()
    statuses = {status for a in load.answers for _, status, _ in a}
    assert statuses == {200}, "some request failed during a swap"
    for answers in load.answers:  # each client sees versions only move forward
        versions = [v for _, _, v in answers]
        assert versions == sorted(versions)
    for version, t0 in published.items():
        assert load.first_seen(version) - t0 < 1.0, f"version {version} took over 1 s"


def test_rollback_is_picked_up(redis_url: str, snapshots: list[Snapshot]) -> None:
    store = open_store(redis_url, namespace="rollback")
    store.publish(snapshots[0])
    store.publish(snapshots[1])
    with serving(store) as (server, holder):
        assert holder.wait_for_version(2, 10)
        t0 = time.monotonic()
        store.rollback(1)
        assert holder.wait_for_version(1, 1.0)
        assert time.monotonic() - t0 < 1.0
        r = httpx.post(server.url + "/assign", json={"features": FEATURES})
        assert r.status_code == 200 and r.json()["version"] == 1
    store.close()


def test_corrupt_snapshot_is_rejected_and_the_old_one_kept(
    redis_url: str, snapshots: list[Snapshot]
) -> None:
    store = open_store(redis_url, namespace="corrupt")
    store.publish(snapshots[0])
    with serving(store) as (server, holder):
        assert holder.wait_for_version(1, 10)
        bad = Snapshot(b"not safetensors at all", snapshots[1].manifest)  # sha256 mismatch
        store.publish(bad)
        assert holder.wait_until(lambda h: h.last_error is not None, 5)
        assert "snapshot 2 rejected" in holder.last_error
        r = httpx.post(server.url + "/assign", json={"features": FEATURES})
        assert r.status_code == 200 and r.json()["version"] == 1
        store.publish(snapshots[2])  # the next good one goes in
        assert holder.wait_for_version(3, 5)
    store.close()


def _store_up(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return families["oclust_store_up"].samples[0].value


def test_store_outage_keeps_serving_and_says_so(
    outage_redis: object, snapshots: list[Snapshot]
) -> None:
    url = f"redis://{outage_redis.host}:{outage_redis.port}/0"  # type: ignore[attr-defined]
    store = open_store(url, namespace="outage", poll_interval=0.2, socket_timeout=1.0)
    store.client.flushdb()
    store.publish(snapshots[0])
    with serving(store) as (server, holder):
        assert holder.wait_for_version(1, 10)
        assert holder.wait_until(lambda h: h.store_up is True, 5)
        assert _store_up(server.url) == 1.0
        outage_redis.stop()  # type: ignore[attr-defined]
        try:
            assert holder.wait_until(lambda h: h.store_up is False, 10)
            assert _store_up(server.url) == 0.0
            r = httpx.post(server.url + "/assign", json={"features": FEATURES})
            assert r.status_code == 200 and r.json()["version"] == 1
            assert httpx.get(server.url + "/readyz").status_code == 200
        finally:
            outage_redis.start()  # type: ignore[attr-defined]
        assert holder.wait_until(lambda h: h.store_up is True, 10)
        assert _store_up(server.url) == 1.0
        version = store.publish(snapshots[1])
        if version == 1:  # the restarted server lost its data, so versions restarted
            version = store.publish(snapshots[2])
        assert holder.wait_for_version(version, 5)
    store.close()


def test_service_starts_before_the_first_snapshot(
    redis_url: str, snapshots: list[Snapshot]
) -> None:
    store = open_store(redis_url, namespace="late")
    with serving(store) as (server, holder):
        r = httpx.get(server.url + "/readyz")
        assert r.status_code == 503 and "no snapshot" in r.json()["reason"]
        assert httpx.post(server.url + "/assign", json={"features": FEATURES}).status_code == 503
        store.publish(snapshots[0])
        assert holder.wait_for_version(1, 2)
        assert httpx.get(server.url + "/readyz").status_code == 200
    store.close()


def test_directory_store_hot_reload(tmp_path: object, snapshots: list[Snapshot]) -> None:
    store = open_store(f"file://{tmp_path}", namespace="dir")
    store.publish(snapshots[0])
    with serving(store) as (server, holder):
        assert holder.wait_for_version(1, 10)
        store.publish(snapshots[1])
        assert holder.wait_for_version(2, 2)
        r = httpx.post(server.url + "/assign", json={"features": FEATURES})
        assert r.json()["version"] == 2
