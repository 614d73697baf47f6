"""Rules of resuming and bookkeeping that a review found broken: each test fails on the old code.

* offsets published while replaying below a snapshot never go below that snapshot's offset;
* a pointer naming a missing version, or a garbled pointer, falls back to the newest valid one;
* an empty store whose consumer group cannot be checked refuses a fresh model (fails closed);
* a multi-sample message can only fail as a dead letter, and decoding one message at a time
  keeps all its rows;
* the collapse guard never judges fewer served labels than a batch.
"""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import numpy as np
import pytest

from oclust.model import OnlineClusterer
from oclust.training_worker.batching import SampleQueue
from oclust.training_worker.codec import (
    CONTENT_TYPE_F32,
    DecodeError,
    SampleDecoder,
    decode_matrix,
    encode_matrix,
)
from oclust.training_worker.ingest import SampleIngest
from oclust.training_worker.ledger import OffsetLedger
from oclust.training_worker.monitor import CollapseGuard
from oclust.training_worker.resume import FreshStartRefused, current_snapshot, refuse_fresh_start
from oclust.training_worker.settings import WorkerSettings
from oclust.training_worker.store import open_store


def _msg(offset: int) -> SimpleNamespace:
    return SimpleNamespace(offset=offset, partition=0, topic="t", value=b"", headers=[])


def test_a_replay_below_the_snapshot_never_publishes_a_lower_offset() -> None:
    # crash between publishing offset 100 and committing it: the group restarts at 60
    ledger = OffsetLedger("t", {"t:0": 100})
    ledger.skip_below[0] = 100
    assert ledger.unseen(0, [_msg(o) for o in range(60, 80)]) == []
    assert ledger.covered({}) == {"t:0": 100}  # was 80: the next snapshot went backwards
    kept = ledger.unseen(0, [_msg(o) for o in range(80, 110)])
    assert [m.offset for m in kept] == list(range(100, 110))
    ledger.fetched(0, 110)
    assert ledger.covered({}) == {"t:0": 110}
    assert ledger.covered({0: 105}) == {"t:0": 105}  # 105.. still waits to be trained


def _store_with_two_versions(tmp_path):
    store = open_store(f"file://{tmp_path}", "ns")
    X = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    clf = OnlineClusterer(n_clusters=2, latent_dim=4, random_state=0, device="cpu")
    for _ in range(2):
        store.publish(clf.partial_fit(X).to_snapshot())
    return store


@pytest.mark.parametrize("pointer", [b"7", b"abc"])
def test_a_bad_pointer_falls_back_to_the_newest_valid_version(tmp_path, pointer) -> None:
    store = _store_with_two_versions(tmp_path)
    (tmp_path / "ns" / "current").write_bytes(pointer)  # an unstored version / garbage
    snap = current_snapshot(store)
    assert snap is not None and snap.version == 2  # was: None (a fresh model) / a crash


def test_an_empty_store_is_still_empty(tmp_path) -> None:
    assert current_snapshot(open_store(f"file://{tmp_path}", "ns")) is None


def test_an_empty_store_with_an_unreachable_broker_refuses_a_fresh_model(tmp_path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = WorkerSettings(bootstrap_servers=f"127.0.0.1:{port}", topic="t",
                              store=f"file://{tmp_path}", namespace="ns")
    store = open_store(settings.store, settings.namespace)
    with pytest.raises(FreshStartRefused, match="--allow-fresh"):
        asyncio.run(refuse_fresh_start(settings, store))
    allowed = settings.model_copy(update={"allow_fresh": True})
    asyncio.run(refuse_fresh_start(allowed, store))  # the operator's explicit choice


def test_a_hostile_matrix_header_is_a_dead_letter_not_an_exception() -> None:
    value, _ = encode_matrix(np.zeros((2, 3), np.float32))
    headers = [("content-type", CONTENT_TYPE_F32.encode()), ("rows", b"2"),
               ("shape", ",".join(["1"] * 70).encode())]  # more dimensions than numpy allows
    with pytest.raises(DecodeError):
        decode_matrix(value, headers, None)


def test_decoding_one_message_at_a_time_keeps_every_row() -> None:
    queue = SampleQueue()
    ingest = SampleIngest(SampleDecoder(shape=(3,)), queue)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    value, headers = encode_matrix(x)
    msgs = [SimpleNamespace(offset=0, partition=0, value=value, headers=headers)]
    batch = ingest._decode_each(msgs)  # the path taken when a whole fetch fails to decode
    assert not batch.rejects
    np.testing.assert_array_equal(batch.features, x)
    assert batch.index.tolist() == [0, 0, 0, 0]


def test_the_guard_never_judges_fewer_samples_than_a_batch() -> None:
    guard = CollapseGuard(threshold=0.5, patience=1, min_window=64)
    assert not guard.observe_labels(np.zeros(20, np.int64), n_clusters=2)  # 20 >= 10 K
    assert not guard.judging  # a short first batch is not judged alone
    assert guard.observe_labels(np.zeros(44, np.int64), n_clusters=2)  # 64 collapsed: fires
