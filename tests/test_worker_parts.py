"""The worker's small parts: sample queue, collapse guard, quality window, leases (real Redis)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from training_worker.batching import SampleQueue
from training_worker.lease import FileLease, RedisLease, make_lease
from training_worker.monitor import CollapseGuard, QualityWindow, WorkerMetrics
from training_worker.store import DirectoryStore, RedisStore


def test_queue_cuts_batches_across_chunks_and_tracks_pending_offsets():
    q = SampleQueue()
    assert q.first_at is None and q.pending() == {}
    q.put(np.arange(6, dtype=np.float32).reshape(3, 2), np.array([0, 1, 2]), 0, [10, 11, 12])
    q.put(np.arange(4, dtype=np.float32).reshape(2, 2), np.array([-1, 4]), 1, [5, 6])
    assert len(q) == 5 and q.first_at is not None
    b = q.take(4)
    assert b.x.shape == (4, 2) and b.labels.tolist() == [0, 1, 2, -1]
    assert q.pending() == {1: 6}
    assert len(q.take(10)) == 1
    assert len(q) == 0 and q.first_at is None and q.pending() == {}
    with pytest.raises(ValueError, match="empty"):
        q.take(1)


def test_queue_pins_windows_to_several_partitions_and_forgets_revoked_ones():
    q = SampleQueue()
    q.put_pinned(np.zeros((2, 3, 4), np.float32), np.array([1, 0]), [{0: 3, 1: 9}, {0: 5}])
    q.put(np.zeros((1, 3, 4), np.float32), np.array([0]), 2, [40])
    assert q.pending() == {0: 3, 1: 9, 2: 40}
    q.forget_partitions({1})
    assert q.pending() == {0: 5, 2: 40} and len(q) == 2
    q.forget_partitions({0, 2})
    assert len(q) == 0 and q.first_at is None


def test_guard_fires_after_patience_and_can_fire_again():
    g = CollapseGuard(threshold=1.0, patience=3)
    fired = [g.observe(h) for h in [2.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 2.0]]
    assert fired == [False, False, False, True, False, False, True, False]
    assert g.events == 2 and g.healthy
    g.observe(0.1)
    assert not g.healthy  # a single low batch already withholds the next snapshot
    g.reset()
    assert g.healthy
    with pytest.raises(ValueError):
        CollapseGuard(1.0, 0)


def test_quality_window_scores_only_labelled_samples():
    q = QualityWindow(size=10)
    assert q.scores() == {}
    q.add(np.array([0, -1, 1, 1]), np.array([5, 7, 6, 6]))
    assert len(q) == 3
    assert q.scores() == {"acc": 1.0, "nmi": 1.0}
    q.add(np.array([1] * 20), np.array([5] * 20))  # the window keeps the last 10
    assert len(q) == 10


def test_metric_names_are_the_documented_ones():
    names = {m.name for m in WorkerMetrics().registry.collect()}
    assert {
        "oclust_worker_samples", "oclust_worker_batches", "oclust_worker_step_seconds",
        "oclust_worker_loss", "oclust_worker_served_hard_entropy_nats",
        "oclust_worker_served_kl_star_nats", "oclust_worker_train_hard_entropy_nats",
        "oclust_worker_train_kl_star_nats", "oclust_worker_consumer_lag",
        "oclust_worker_dlq_messages", "oclust_worker_snapshots_published",
        "oclust_worker_snapshot_version", "oclust_worker_collapse_events",
        "oclust_worker_collapsed",
    } <= names  # counters are exported with a _total suffix


def test_redis_lease_is_exclusive_renewable_and_lapses(redis_url):
    store = RedisStore(redis_url, namespace="ns")
    a = make_lease(store, "a", ttl=0.3)
    b = make_lease(store, "b", ttl=0.3)
    assert isinstance(a, RedisLease)
    assert a.try_acquire() and not b.try_acquire()
    assert a.holder() == "a"
    assert a.renew() and not b.renew()
    b.release()  # not b's: nothing happens
    assert a.holder() == "a"
    # a stops renewing: the key lapses (Redis expiry) and the standby gets it
    lapsed = threading.Event()

    def standby() -> None:
        while not b.try_acquire():
            lapsed.wait(0.05)
        lapsed.set()

    t = threading.Thread(target=standby)
    t.start()
    assert lapsed.wait(5), "the lease never lapsed"
    t.join()
    assert b.holder() == "b" and not a.renew()
    b.release()
    assert a.try_acquire()


def test_file_lease_is_exclusive_until_released(tmp_path):
    store = DirectoryStore(tmp_path, "ns")
    a, b = make_lease(store, "a"), make_lease(store, "b")
    assert isinstance(a, FileLease)
    assert a.try_acquire() and a.try_acquire() and not b.try_acquire()
    assert a.holder() == "a"
    a.release()
    assert b.try_acquire() and not a.try_acquire()
