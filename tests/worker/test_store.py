"""Snapshot stores against a real redis-server (pytest-redis) and a real directory."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import torch

from oclust.model.snapshot import Snapshot, SnapshotError, pack_tensors
from oclust.training_worker.store import (
    CorruptPointer,
    DirectoryStore,
    RedisStore,
    SnapshotStore,
    StoreError,
    VersionNotFound,
    open_store,
)

StoreFactory = Callable[..., SnapshotStore]


def _snap(value: float = 0.0, **manifest: object) -> Snapshot:
    weights = pack_tensors({"centroids": torch.full((3, 4), value)})
    return Snapshot.create(weights, {"n_clusters": 3, **manifest})


@pytest.fixture(params=["redis", "dir"])
def make_store(request, tmp_path) -> Iterator[StoreFactory]:
    """Factory of stores of one kind, all on the same backend and namespace."""
    opened: list[SnapshotStore] = []
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = f"file://{tmp_path / 'store'}"

    def make(keep: int | None = 5, **options: float) -> SnapshotStore:
        store = open_store(url, namespace="ns", keep=keep, **options)
        opened.append(store)
        return store

    yield make
    for s in opened:
        s.close()


def test_publish_load_round_trip(make_store):
    store = make_store()
    assert store.current_version() is None
    assert store.versions() == []
    snap = _snap(1.5, samples_seen=42)
    v = store.publish(snap)
    assert v == 1
    got = store.load()
    assert got.weights == snap.weights
    assert got.version == 1
    assert got.manifest["samples_seen"] == 42
    renewed = ("version", "integrity")  # the checksum covers the stamped version
    assert {k: got.manifest[k] for k in snap.manifest if k not in renewed} == {
        k: v for k, v in snap.manifest.items() if k not in renewed
    }
    assert store.load(1) == got
    assert store.ping()


def test_versions_are_previous_max_plus_one(make_store):
    store = make_store(keep=None)
    assert [store.publish(_snap(i)) for i in range(3)] == [1, 2, 3]
    store.rollback(1)
    assert store.current_version() == 1
    assert store.publish(_snap(9)) == 4  # after a rollback: still max + 1
    assert store.versions() == [1, 2, 3, 4]
    # a second handle on the same store continues the sequence
    assert make_store(keep=None).publish(_snap(10)) == 5


def test_pruning_keeps_the_last_versions(make_store):
    store = make_store(keep=3)
    for i in range(5):
        store.publish(_snap(i))
    assert store.versions() == [3, 4, 5]
    with pytest.raises(VersionNotFound, match="version 1 is not stored"):
        store.load(1)
    store.rollback(3)
    assert store.versions() == [3, 4, 5]
    assert store.load().version == 3


def test_rollback_to_missing_version_is_refused(make_store):
    store = make_store()
    store.publish(_snap())
    with pytest.raises(VersionNotFound, match="cannot roll back to version 7"):
        store.rollback(7)
    assert store.current_version() == 1


def test_load_missing_raises_clear_error(make_store):
    store = make_store()
    with pytest.raises(VersionNotFound, match="no snapshot published yet"):
        store.load()
    store.publish(_snap())
    with pytest.raises(VersionNotFound, match="version 2 is not stored"):
        store.load(2)
    assert isinstance(VersionNotFound("x"), LookupError)


def test_reader_never_sees_a_half_written_version(make_store):
    """Pointer moves only after both blobs are in place: concurrent loads always succeed."""
    writer, reader = make_store(keep=None), make_store(keep=None)
    writer.publish(_snap(0))
    done = threading.Event()
    errors: list[BaseException] = []
    seen: set[int] = set()

    def read() -> None:
        while not done.is_set():
            try:
                seen.add(reader.load().version)
            except BaseException as exc:
                errors.append(exc)
                return

    t = threading.Thread(target=read)
    t.start()
    try:
        for i in range(1, 40):
            writer.publish(_snap(i))
    finally:
        done.set()
        t.join()
    assert errors == []
    assert max(seen) <= 40
    assert reader.load().version == 40


def test_checksum_mismatch_raises(make_store, request):
    store = make_store()
    v = store.publish(_snap(2.0))
    tampered = pack_tensors({"centroids": torch.full((3, 4), 3.0)})
    if isinstance(store, RedisStore):
        store.client.set(store.key("weights", v), tampered)
    else:
        assert isinstance(store, DirectoryStore)
        (store.path / f"weights-{v}.safetensors").write_bytes(tampered)
    with pytest.raises(SnapshotError, match="sha256"):
        store.load()


def test_wait_for_change_returns_at_once_when_already_different(make_store):
    store = make_store()
    store.publish(_snap())
    t0 = time.monotonic()
    assert store.wait_for_change(None, timeout=10) == 1
    assert time.monotonic() - t0 < 1
    t0 = time.monotonic()
    assert store.wait_for_change(1, timeout=0.2) == 1  # times out, returns current
    assert 0.15 < time.monotonic() - t0 < 2


def _wait_in_thread(store: SnapshotStore, known: int | None) -> tuple[threading.Event, list]:
    done, result = threading.Event(), []

    def run() -> None:
        result.append(store.wait_for_change(known, timeout=60))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done, result


def test_redis_wait_for_change_woken_by_pubsub(redis_url):
    watcher = RedisStore(redis_url, namespace="ns", poll_interval=60)  # polling can't wake it
    publisher = RedisStore(redis_url, namespace="ns")
    publisher.publish(_snap())
    done, result = _wait_in_thread(watcher, known=1)
    probe = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 10
    while probe.pubsub_numsub("ns:events")[0][1] < 1:  # the watcher has subscribed
        assert time.monotonic() < deadline, "watcher never subscribed to ns:events"
        time.sleep(0.005)
    t0 = time.monotonic()
    publisher.publish(_snap(1))
    assert done.wait(5), "wait_for_change was not woken by the notice"
    assert result == [2]
    assert time.monotonic() - t0 < 5


def test_redis_events_announce_publish_and_rollback(redis_url):
    store = RedisStore(redis_url, namespace="ns")
    sub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    sub.subscribe("ns:events")
    store.publish(_snap())
    store.publish(_snap(1))
    store.rollback(1)
    notices: list[dict] = []
    deadline = time.monotonic() + 10
    while len(notices) < 3:  # the subscribe confirmation comes back as None
        assert time.monotonic() < deadline, f"missing notices, got {notices}"
        msg = sub.get_message(timeout=5)
        if msg is not None:
            notices.append(json.loads(msg["data"]))
    assert notices == [{"version": 1}, {"version": 2}, {"version": 1, "rollback": True}]


def test_redis_polling_catches_a_missed_notice(redis_url):
    watcher = RedisStore(redis_url, namespace="ns", poll_interval=0.05)
    publisher = RedisStore(redis_url, namespace="ns")
    publisher.publish(_snap())
    publisher.publish(_snap(1))
    publisher.rollback(1)
    done, result = _wait_in_thread(watcher, known=1)
    redis.Redis.from_url(redis_url).set("ns:current", 2)  # pointer moved, no notice sent
    assert done.wait(5), "polling did not notice the pointer change"
    assert result == [2]


def test_directory_wait_for_change_polls(tmp_path):
    watcher = DirectoryStore(tmp_path, "ns", poll_interval=0.02)
    publisher = DirectoryStore(tmp_path, "ns")
    done, result = _wait_in_thread(watcher, known=None)
    publisher.publish(_snap())
    assert done.wait(5)
    assert result == [1]


def test_redis_layout_is_the_documented_one(redis_url):
    store = RedisStore(redis_url, namespace="oc", keep=2)
    snap = _snap(4.0)
    store.publish(snap)
    store.publish(snap)
    store.publish(snap)
    raw = redis.Redis.from_url(redis_url)
    assert raw.get("oc:current") == b"3"
    assert raw.get("oc:weights:3") == snap.weights
    manifest = json.loads(raw.get("oc:manifest:3"))
    assert manifest["version"] == 3 and manifest["sha256"] == snap.sha256
    assert raw.exists("oc:weights:1", "oc:manifest:1") == 0
    assert raw.exists("oc:weights:2", "oc:manifest:2") == 2


def test_directory_layout_is_the_documented_one(tmp_path):
    store = DirectoryStore(tmp_path, "oc", keep=1)
    snap = _snap(4.0)
    store.publish(snap)
    store.publish(snap)
    files = sorted(p.name for p in (tmp_path / "oc").iterdir() if not p.name.startswith("."))
    assert files == ["current", "manifest-2.json", "seq", "weights-2.safetensors"]
    assert (tmp_path / "oc" / "current").read_text() == "2"
    assert (tmp_path / "oc" / "weights-2.safetensors").read_bytes() == snap.weights


def test_unreachable_redis_gives_clear_errors():
    from oclust.training_worker.devbroker import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", namespace="ns", socket_timeout=1)
    assert store.ping() is False
    with pytest.raises(StoreError, match=r"Redis at redis://127\.0\.0\.1:\d+/0 failed"):
        store.publish(_snap())
    with pytest.raises(StoreError, match="reading the current version"):
        store.current_version()


@pytest.mark.parametrize(
    ("url", "kind"),
    [("redis://127.0.0.1:6399/0", RedisStore), ("file:///tmp/x", DirectoryStore),
     ("relative/dir", DirectoryStore)],
)
def test_open_store_by_scheme(url, kind):
    assert isinstance(open_store(url, "ns"), kind)


@pytest.mark.parametrize(
    ("url", "namespace", "keep", "match"),
    [("ftp://x", "ns", 5, "unknown store URL scheme"), ("", "ns", 5, "no store given"),
     ("file:///tmp/x", "a b", 5, "namespace"), ("file:///tmp/x", "ns", 0, "keep"),
     # redis-py's ValueError, then the message's url raised it again: a traceback
     ("redis://127.0.0.1:abc/0", "ns", 5, r"bad Redis URL redis://127\.0\.0\.1:abc/0: Port"),
     ("redis://u:pw@127.0.0.1:99999/0", "ns", 5,
      r"^bad Redis URL redis://127\.0\.0\.1:99999/0: Port out of range")],
)
def test_open_store_rejects_bad_arguments(url, namespace, keep, match):
    with pytest.raises(StoreError, match=match):
        open_store(url, namespace, keep=keep)


def test_redis_url_hides_password():
    store = RedisStore("redis://user:secret@127.0.0.1:6399/2", namespace="ns")
    assert store.url == "redis://127.0.0.1:6399/2"


def _set_pointer(store: SnapshotStore, raw: bytes) -> None:
    if isinstance(store, RedisStore):
        store.client.set(store.key("current"), raw)
    else:
        assert isinstance(store, DirectoryStore)
        (store.path / "current").write_bytes(raw)


@pytest.mark.parametrize(
    "raw",
    [b"abc", b"", b"-1", b"1.5", b"\xff\x00", b"9" * 40, "²".encode(), "١".encode()],
)  # the last two are digits to str.isdigit() that int() refuses or reads as another number
def test_a_garbled_pointer_is_a_clear_store_error_and_rollback_repairs_it(
    make_store: StoreFactory, raw: bytes
) -> None:
    store = make_store()
    store.publish(_snap(1.0))
    _set_pointer(store, raw)
    with pytest.raises(CorruptPointer, match="rollback"):
        store.current_version()
    with pytest.raises(StoreError):  # a CorruptPointer is a StoreError: callers handle it
        store.load()
    assert store.versions() == [1] and store.load(1).version == 1
    store.rollback(1)
    assert store.current_version() == 1


def test_a_legacy_format_snapshot_is_still_read(make_store: StoreFactory) -> None:
    from oclust.model.snapshot import LEGACY_FORMAT

    snap = _snap(2.0)
    legacy = {k: v for k, v in snap.manifest.items() if k != "integrity"}
    old = Snapshot(snap.weights, {**legacy, "format": LEGACY_FORMAT})
    store = make_store()
    version = store.publish(old)
    loaded = store.load(version)
    assert loaded.legacy and "integrity" not in loaded.manifest


def test_an_edited_manifest_is_refused(make_store: StoreFactory) -> None:
    store = make_store()
    version = store.publish(_snap(3.0))
    snap = store.load(version)
    edited = Snapshot(snap.weights, {**snap.manifest, "n_clusters": 4})
    with pytest.raises(SnapshotError, match="integrity"):
        edited.verify()


def test_a_publish_fenced_by_a_lost_lease_writes_nothing(redis_url):
    from oclust.training_worker.lease import make_lease
    from oclust.training_worker.store import LeaseLost

    store = RedisStore(redis_url, namespace="fence")
    mine, theirs = make_lease(store, "a", ttl=30), make_lease(store, "b", ttl=30)
    assert mine.try_acquire()
    assert store.publish(_snap(1.0), owner="a") == 1  # still ours: published
    mine.release()  # paused past the TTL: the lease lapsed, and a successor took it
    assert theirs.try_acquire()
    assert store.publish(_snap(2.0), owner="b") == 2
    with pytest.raises(LeaseLost, match="held by 'b'"):
        store.publish(_snap(3.0), owner="a")  # the paused worker wakes and publishes
    assert store.current_version() == 2 and store.versions() == [1, 2]
    assert store.publish(_snap(4.0)) == 4  # unfenced (oclust train): no lease asked
    store.close()
