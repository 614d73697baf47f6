"""The worker's small parts: sample queue, collapse guard, quality window, leases (real Redis)."""

from __future__ import annotations

import logging
import math
import threading

import numpy as np
import pytest
import torch
from torch import nn

from oclust.model import OnlineClusterer
from oclust.training_worker.batching import Batch, SampleQueue
from oclust.training_worker.lease import FileLease, RedisLease, make_lease
from oclust.training_worker.monitor import (
    RECOVERY,
    CollapseGuard,
    InputReservoir,
    QualityWindow,
    WorkerMetrics,
    default_threshold,
)
from oclust.training_worker.settings import WorkerSettings
from oclust.training_worker.store import DirectoryStore, RedisStore
from oclust.training_worker.trainer import ModelBroken, Trainer


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
    assert g.events == 2 and not g.healthy  # one good judgement does not clear a collapse
    for _ in range(RECOVERY - 1):
        g.observe(2.0)
    assert g.healthy
    g.observe(0.1)
    assert not g.healthy  # a single low batch already withholds the next snapshot
    g.reset()  # restored weights: not published again until judged
    assert not g.healthy
    g.observe(2.0)
    assert g.healthy


def test_a_collapsed_model_whose_entropy_peaks_for_a_batch_is_not_published():
    # low judgements with a lone peak between them: publishable on every peak before
    g = CollapseGuard(threshold=1.0, patience=20)
    verdicts = []
    for i in range(100):
        g.observe(1.5 if i % 7 == 6 else 0.2)
        verdicts.append(g.healthy)
    assert not any(verdicts)
    for _ in range(RECOVERY):
        g.observe(1.5)
    assert g.healthy


def test_a_window_too_short_to_judge_still_withholds_a_collapsed_start():
    # the guard abstains below 10 K samples; a model serving them all to one cluster was
    # published anyway (a slow stream: one sample per batch)
    k = 10
    g = CollapseGuard(threshold=0.5 * math.log(k), patience=20, min_window=256)
    for _ in range(15):
        g.observe_labels(np.zeros(1, np.int64), k)
    assert not g.judging and not g.healthy
    g = CollapseGuard(threshold=0.5 * math.log(k), patience=20, min_window=256)
    for i in range(15):
        g.observe_labels(np.array([i % k]), k)
    assert not g.judging and g.healthy  # 15 samples spread over the clusters
    g = CollapseGuard(threshold=0.5 * math.log(k), patience=20, min_window=256)
    for _ in range(k - 1):
        g.observe_labels(np.zeros(1, np.int64), k)
    assert g.healthy  # fewer than K samples tell a collapse from luck too rarely
    with pytest.raises(ValueError):
        CollapseGuard(1.0, 0)


def test_guard_judges_a_window_of_served_labels_not_the_latest_batch():
    k = 10
    g = CollapseGuard(threshold=0.5 * math.log(k), patience=1, min_window=256)
    assert g.window_size(k) == 256  # max(20 K, a batch)
    assert CollapseGuard(1.0, 1, window=50, min_window=64).window_size(k) == 100  # >= 10 K
    assert CollapseGuard(1.0, 1, window=50, min_window=128).window_size(k) == 128  # >= a batch
    assert not g.observe_labels(np.zeros(5, np.int64), k)  # too few samples: abstains
    assert not g.judging and g.healthy  # and 5 (< K) cannot tell a collapse from luck
    assert not g.observe_labels(np.zeros(10, np.int64), k)
    assert not g.judging and not g.healthy  # but 15 in one cluster are not published
    balanced = np.arange(256) % k
    for _ in range(3):
        assert not g.observe_labels(balanced, k)
    assert g.judging and g.healthy
    # A short final batch, all in one cluster, does not withhold the next snapshot: the window
    # still holds the 251 samples before it.
    assert not g.observe_labels(np.zeros(5, np.int64), k)
    assert g.healthy and g.window_entropy() > g.threshold
    # A collapse of the served labels over a whole window fires.
    assert g.observe_labels(np.zeros(256, np.int64), k)
    assert g.events == 1 and not g.healthy and g.window_shares()[0] == 1.0
    g.reset()  # after a restore: a fresh window, judged again once refilled
    assert not g.healthy and not g.judging  # the restored weights are withheld until then
    assert not g.observe_labels(balanced, k)
    assert g.judging and g.healthy


def test_a_window_set_below_k_is_raised_so_a_balanced_stream_never_fires():
    # 8 samples cannot show an entropy above log 8 < 0.5 log 100: the window is raised to 10 K.
    k, batch = 100, 8
    s = WorkerSettings(topic="t", n_clusters=k, collapse_window=8, batch_size=batch)
    g = CollapseGuard(s.collapse_threshold_nats, s.collapse_patience, window=s.collapse_window,
                      min_window=s.batch_size)
    assert g.window_size(k) == 10 * k
    fired = [g.observe_labels(np.arange(batch) + batch * (i % 12), k) for i in range(400)]
    assert not any(fired) and g.healthy and g.judging


def test_the_default_threshold_follows_a_fixed_prior():
    # A model whose served shares follow its uneven prior is healthy; one cluster alone is not.
    prior = np.array([0.91] + [0.01] * 9)
    s = WorkerSettings(topic="t", n_clusters=10, prior=",".join(map(str, prior)))
    assert s.collapse_threshold_nats == pytest.approx(default_threshold(list(prior), 10))
    assert s.collapse_threshold_nats < 0.5 * math.log(10)
    assert WorkerSettings(topic="t", n_clusters=10).collapse_threshold_nats == pytest.approx(
        0.5 * math.log(10))
    assert WorkerSettings(topic="t", n_clusters=10, prior="online").collapse_threshold_nats == (
        pytest.approx(0.5 * math.log(10)))
    rng = np.random.default_rng(0)
    g = CollapseGuard(s.collapse_threshold_nats, 3, min_window=256)
    fired = [g.observe_labels(rng.choice(10, size=256, p=prior), 10) for _ in range(40)]
    assert not any(fired) and g.healthy
    assert any(g.observe_labels(np.zeros(256, np.int64), 10) for _ in range(3))


@pytest.mark.parametrize("prior", ["online", "0.91" + ",0.01" * 9])
def test_a_resumed_worker_judges_against_its_configured_prior(tmp_path, prior):
    # The threshold of a resumed snapshot comes from its configured prior, never from the
    # online estimate (which a collapsing model pulls toward its dominant cluster).
    from oclust.model.priors import parse_prior
    from oclust.training_worker.resume import FaultMetrics, load_trainer
    from oclust.training_worker.trainer import TrainerHooks

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(2048, 6)) + 4 * (rng.random((2048, 1)) < 0.8)).astype(np.float32)
    params = {"max_kl": 2.0, "warmup": 0, "shrink": 0.0} if prior == "online" else None
    clf = OnlineClusterer(10, prior=parse_prior(prior), prior_params=params, latent_dim=4,
                          hidden=(8,), seed=0).fit(X, epochs=2)
    store = DirectoryStore(str(tmp_path), "t")
    store.publish(clf.to_snapshot())
    s = WorkerSettings(topic="t", n_clusters=10, store=f"file://{tmp_path}", namespace="t")
    metrics = WorkerMetrics()
    trainer = load_trainer(s, store, metrics, FaultMetrics(metrics.registry), TrainerHooks(), "cpu")
    assert trainer.guard.threshold == pytest.approx(default_threshold(parse_prior(prior), 10))
    if prior == "online":
        assert trainer.guard.threshold == pytest.approx(0.5 * math.log(10))
        assert default_threshold(trainer.model.prior_, 10) < trainer.guard.threshold  # estimate


def test_a_resumed_snapshot_keeps_its_prior_and_says_so(tmp_path, caplog):

    from oclust.training_worker.resume import FaultMetrics, load_trainer
    from oclust.training_worker.trainer import TrainerHooks

    X = np.random.default_rng(0).normal(size=(256, 6)).astype(np.float32)
    caplog.set_level(logging.WARNING, logger="oclust.training_worker.resume")
    said = {}
    for name, prior, params, cap in (
        ("online, other cap", "online", {"max_kl": 0.3}, 0.2),
        ("online, same cap", "online", {"max_kl": 0.2}, 0.2),
        ("uniform", None, None, 0.2),
    ):
        store = DirectoryStore(str(tmp_path / name.replace(" ", "-").replace(",", "")), "t")
        clf = OnlineClusterer(4, prior=prior, prior_params=params, latent_dim=4, hidden=(8,),
                              seed=0).partial_fit(X)
        store.publish(clf.to_snapshot())
        s = WorkerSettings(topic="t", n_clusters=4, prior="online", prior_max_kl=cap)
        metrics = WorkerMetrics()
        caplog.clear()
        trainer = load_trainer(s, store, metrics, FaultMetrics(metrics.registry),
                               TrainerHooks(), "cpu")
        said[name] = " ".join(r.getMessage() for r in caplog.records)
        if prior == "online":
            assert trainer.model.prior_estimator_.max_kl == params["max_kl"]  # the snapshot's
    assert "keeps its own KL cap 0.3" in said["online, other cap"]
    assert said["online, same cap"] == ""
    assert "not online" in said["uniform"] and "None" not in said["uniform"]


def test_a_resumed_snapshot_keeps_its_input_clip_and_views_and_says_so(tmp_path, caplog):

    from oclust.training_worker.resume import FaultMetrics, load_trainer
    from oclust.training_worker.trainer import TrainerHooks

    X = np.random.default_rng(0).normal(size=(256, 6)).astype(np.float32)
    store = DirectoryStore(str(tmp_path), "t")
    store.publish(OnlineClusterer(4, latent_dim=4, hidden=(8,), seed=0, clip=3.0)
                  .partial_fit(X).to_snapshot())
    caplog.set_level(logging.WARNING, logger="oclust.training_worker.resume")
    said = {}
    for value in (None, 3.0, float("inf")):
        s = WorkerSettings(topic="t", n_clusters=4, input_clip=value)
        metrics = WorkerMetrics()
        caplog.clear()
        trainer = load_trainer(s, store, metrics, FaultMetrics(metrics.registry),
                               TrainerHooks(), "cpu")
        assert trainer.model.clip == 3.0 and trainer.model.scaler_.clip == 3.0  # the snapshot's
        said[value] = " ".join(r.getMessage() for r in caplog.records)
    assert said[None] == said[3.0] == ""
    assert "keeps its own input clip 3.0 (--input-clip inf" in said[float("inf")]
    for value in (False, True):
        s, metrics = WorkerSettings(topic="t", n_clusters=4, views=value), WorkerMetrics()
        caplog.clear()
        trainer = load_trainer(s, store, metrics, FaultMetrics(metrics.registry),
                               TrainerHooks(), "cpu")
        assert trainer.model.views_ is False  # the snapshot's: vectors train without
        said[value] = " ".join(r.getMessage() for r in caplog.records)
    assert said[False] == "" and "keeps its own views setting False (--views True" in said[True]


class _OnePoint(nn.Module):
    """An encoder that maps every input to the same latent point."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.point = nn.Parameter(torch.linspace(-1.0, 1.0, latent_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point.expand(len(x), -1)


def test_guard_fires_on_a_collapsed_encoder_that_ca_training_labels_hide():
    k, n = 5, 64
    X = np.random.default_rng(0).normal(size=(n * 8, 6)).astype(np.float32)
    clf = OnlineClusterer(n_clusters=k, regulariser="ca", latent_dim=8, seed=0)
    clf.partial_fit(X[:n])  # builds the model and spreads the centroids
    clf.encoder_ = _OnePoint(8)  # now every input has the same latent
    metrics = WorkerMetrics()
    guard = CollapseGuard(threshold=0.5 * math.log(k), patience=3, min_window=n)
    trainer = Trainer(clf, guard, metrics, restore=False)
    fired_at = None
    for i in range(1, 8):
        report = trainer.step(Batch(X[i * n : (i + 1) * n], np.full(n, -1)))
        assert report is not None
        # CA keeps the training labels balanced: 64 points over 5 clusters (12 or 13 each
        # when the centroids are equally far from the one latent point)
        assert report.train_hard_entropy > 0.99 * math.log(k)
        assert np.bincount(report.labels, minlength=k).min() >= n // (2 * k)
        # while every point is served by one centroid
        assert len(set(report.served_labels.tolist())) == 1 and report.served_hard_entropy == 0
        if guard.events and fired_at is None:
            fired_at = i
    assert fired_at is not None, "the guard never fired on a collapsed encoder"
    assert guard.collapsed and not guard.healthy
    reg = metrics.registry
    assert reg.get_sample_value("oclust_worker_collapse_events_total") >= 1
    assert reg.get_sample_value("oclust_worker_collapsed") == 1
    assert reg.get_sample_value("oclust_worker_served_hard_entropy_nats") == 0
    assert reg.get_sample_value("oclust_worker_served_kl_star_nats") == pytest.approx(math.log(k))
    assert reg.get_sample_value("oclust_worker_train_hard_entropy_nats") > 0.99 * math.log(k)
    m = trainer.snapshot_metrics()
    assert m["hard_entropy"] == 0 and m["train_hard_entropy"] > 0.99 * math.log(k)
    assert max(m["shares"]) == 1.0  # the snapshot's shares are served shares


def test_restores_stop_when_the_restored_weights_keep_collapsing_on_a_changed_stream():
    # A lasting change of the stream (a sensor's gain falls to 1 %) collapses the served labels
    # of the healthy weights too: restoring them at every firing threw each adaptation away (13
    # firings and 2 of 26 checkpoints publishable in 400 batches). And the gauge behind the
    # critical alert read 0 throughout: it showed the outstanding collapse, which a restore
    # clears in the same step, not the withheld publishing.
    from oclust.model import datasets
    from oclust.training_worker.trainer import MAX_RESTORES, TrainerHooks

    X = datasets.load("digits")[0].reshape(-1, 64).astype(np.float32)
    rng = np.random.default_rng(0)
    restored: list[int] = []
    hooks = TrainerHooks(on_collapse=lambda _m, snap: restored.append(snap is not None))
    trainer = Trainer(OnlineClusterer(n_clusters=10, seed=0),
                      CollapseGuard(default_threshold("uniform", 10), 20, min_window=256),
                      WorkerMetrics(), hooks=hooks)

    def step(gain: float) -> float:
        trainer.step(Batch(X[rng.choice(len(X), 256)] * gain, np.full(256, -1)))
        return trainer.metrics.registry.get_sample_value("oclust_worker_collapsed")

    for _ in range(30):
        step(1.0)
    assert trainer.guard.healthy
    trainer.published(trainer.snapshot({"t:0": 1}).with_version(1))
    gauge = [step(0.01) for _ in range(300)]
    healthy = trainer.guard.healthy
    assert restored[:MAX_RESTORES] == [True] * MAX_RESTORES and not any(restored[MAX_RESTORES:])
    assert healthy and gauge[-1] == 0  # adapted to the new gain: publishable again
    assert sum(gauge) > 20  # 1 while publishing was held back


def test_the_input_reservoir_keeps_a_sample_that_decays_over_its_horizon():
    r = InputReservoir(rows=200, horizon=2000, seed=0)
    r.add(np.zeros((200, 3), np.float32))
    assert len(r) == 200 and not r.inputs().any()
    r.add(np.ones((2000, 3), np.float32))  # one horizon later: about 1 - 1/e replaced
    replaced = float(r.inputs()[:, 0].mean())
    assert 0.55 < replaced < 0.72, replaced
    r.add(np.ones((10, 3), np.float32))  # a short burst takes a small share
    r.add(np.full((20_000, 3), 2.0, np.float32))  # a lasting change takes it all
    assert set(r.inputs().ravel().tolist()) == {2.0}
    r.add(np.zeros((5, 2, 2), np.float32))  # a new per-sample shape starts a new sample
    assert r.inputs().shape == (5, 2, 2)
    r.add(np.empty((0, 2, 2), np.float32))
    assert len(r) == 5


def test_the_input_reservoir_is_bounded_in_memory():
    from oclust.training_worker.monitor import RESERVOIR_BYTES

    r = InputReservoir(rows=10_000, horizon=10_000)
    r.add(np.zeros((3, 4096), np.float32))
    assert r._kept is not None and r._kept.nbytes <= RESERVOIR_BYTES
    assert len(r._kept) == RESERVOIR_BYTES // (4096 * 4)


def test_a_model_that_learned_a_burst_of_outliers_is_not_published():
    # A sensor fault: ten batches of digits 10^4 times the usual, inside the feature bound. The
    # model learns them (its scaler's variance is inflated for good) and serves the burst well
    # spread, so the guard's window passes it; it serves the usual digits to one cluster. The
    # worker published it, and the guard then restored it, not the model before the burst.
    from oclust.model import datasets
    from oclust.model import metrics as model_metrics

    X = datasets.load("digits")[0].reshape(-1, 64).astype(np.float32)
    rng = np.random.default_rng(0)
    trainer = Trainer(OnlineClusterer(n_clusters=10, seed=0),
                      CollapseGuard(default_threshold("uniform", 10), 20, min_window=256),
                      WorkerMetrics())
    published: list[int] = []

    def step(gain: float) -> None:
        trainer.step(Batch(X[rng.choice(len(X), 256)] * gain, np.full(256, -1)))

    def checkpoint() -> bool:
        if not trainer.guard.healthy:
            return False
        snap = trainer.snapshot({"t:0": 1})
        if not trainer.publishable(snap):
            return False
        published.append(len(published) + 1)
        trainer.published(snap.with_version(published[-1]))
        return True

    def served_entropy() -> float:
        assert trainer.healthy is not None
        labels = OnlineClusterer.from_snapshot(trainer.healthy).predict(X)
        return model_metrics.entropy(np.bincount(labels, minlength=10) / len(labels))

    reg = trainer.metrics.registry
    for _ in range(30):
        step(1.0)
    assert checkpoint() and served_entropy() > 2.0
    before = published[-1]
    burst = []
    for _ in range(10):
        step(1e4)
        guard_passed = trainer.guard.healthy
        burst.append((guard_passed, checkpoint()))
    assert all(guard for guard, _ in burst)  # the window alone would have published it
    assert not any(ok for _, ok in burst)  # the reservoir of older digits did not
    assert reg.get_sample_value("oclust_worker_collapsed") == 1
    assert reg.get_sample_value("oclust_worker_reservoir_hard_entropy_nats") < 0.5
    assert published[-1] == before and served_entropy() > 2.0
    recovered = None
    for i in range(60):  # the usual digits again: the guard fires and restores `before`
        step(1.0)
        if checkpoint() and recovered is None:
            recovered = i
    assert trainer.guard.events == 1 and recovered is not None
    assert served_entropy() > 2.0 and len(published) > before
    assert reg.get_sample_value("oclust_worker_collapsed") == 0


def test_a_trainer_resumed_during_a_burst_judges_on_the_sample_stored_with_its_snapshot():
    # The restart hole: a worker restarted during a burst (say after the judge withheld its
    # final snapshot) resumes from the last published snapshot and replays the burst. With an
    # empty reservoir it judged on the burst alone and published the burst's model. The
    # published snapshot now carries the reservoir's sample, and the resumed trainer judges on it.
    from oclust.model import datasets
    from oclust.model import metrics as model_metrics
    from oclust.model.inference import load
    from oclust.model.snapshot import SAMPLE_HELD, SAMPLE_INPUTS, Snapshot, unpack_arrays

    X = datasets.load("digits")[0].reshape(-1, 64).astype(np.float32)
    rng = np.random.default_rng(0)

    def trainer_from(snap: Snapshot | None) -> Trainer:
        model = (OnlineClusterer(n_clusters=10, seed=0) if snap is None
                 else OnlineClusterer.from_snapshot(snap, device="cpu"))
        return Trainer(model, CollapseGuard(default_threshold("uniform", 10), 20, min_window=256),
                       WorkerMetrics(), healthy=snap)

    def step(trainer: Trainer, gain: float) -> None:
        trainer.step(Batch(X[rng.choice(len(X), 256)] * gain, np.full(256, -1)))

    first = trainer_from(None)
    for _ in range(30):
        step(first, 1.0)
    plain = first.snapshot({"t:0": 30 * 256})
    assert first.publishable(plain)
    published = first.with_sample(plain).with_version(1)
    arrays = unpack_arrays(published.weights)
    assert arrays[SAMPLE_INPUTS].shape == (1024, 64) and arrays[SAMPLE_HELD].tolist() == [1024]
    # stored beside the model, read by no model: what replicas and workers load is unchanged
    assert (OnlineClusterer.from_snapshot(published).predict(X)
            == OnlineClusterer.from_snapshot(plain).predict(X)).all()
    assert load(published)(X).labels.tolist() == load(plain)(X).labels.tolist()

    def publishes_the_burst(resumed_from: Snapshot) -> bool:
        trainer = trainer_from(resumed_from)
        verdicts = []
        for _ in range(10):
            step(trainer, 1e4)
            if trainer.guard.healthy:
                verdicts.append(trainer.publishable(trainer.snapshot({"t:0": 1})))
        labels = trainer.model.predict(X)  # the burst's model serves the usual digits to one
        assert model_metrics.entropy(np.bincount(labels, minlength=10) / len(X)) < 0.5
        return any(verdicts)

    assert not publishes_the_burst(published)
    assert publishes_the_burst(plain.with_version(1))  # no stored sample: the hole, as before


def test_a_stored_sample_that_does_not_fit_the_model_is_not_used(
    caplog: pytest.LogCaptureFixture,
):
    from oclust.model.snapshot import (
        SAMPLE_HELD,
        SAMPLE_INPUTS,
        Snapshot,
        pack_arrays,
        unpack_arrays,
    )

    caplog.set_level(logging.WARNING, logger="oclust.training_worker.trainer")
    X = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    base = Trainer(OnlineClusterer(n_clusters=2, seed=0, hidden=(8,), latent_dim=4),
                   CollapseGuard(0.0, 5), WorkerMetrics())
    base.step(Batch(X, np.full(64, -1)))
    snap = base.with_sample(base.snapshot({"t:0": 64}))
    assert unpack_arrays(snap.weights)[SAMPLE_INPUTS].shape == (64, 4)
    def resumed_from(changes: dict, guard: CollapseGuard | None = None) -> Trainer:
        arrays = unpack_arrays(snap.weights) | changes
        other = Snapshot.create(pack_arrays(arrays), snap.manifest)
        caplog.clear()
        resumed = Trainer(OnlineClusterer.from_snapshot(other), guard or CollapseGuard(0.0, 5),
                          WorkerMetrics(), healthy=other)
        resumed.step(Batch(X[:8], np.full(8, -1)))  # raised ValueError on a NaN held count
        return resumed

    for bad in ({SAMPLE_INPUTS: np.zeros((3, 5), np.float32)},
                {SAMPLE_INPUTS: np.full((3, 4), np.nan, np.float32)},
                {SAMPLE_INPUTS: np.zeros((3, 4), np.float64)},
                {SAMPLE_HELD: np.array([np.nan])}, {SAMPLE_HELD: np.array([-5], np.int64)}):
        resumed = resumed_from(bad)
        assert resumed.reservoir is not None and len(resumed.reservoir) == 8
        assert "does not fit the model" in caplog.text
    subset = {SAMPLE_HELD: np.array([100], np.int64)}  # 64 stored of the 100 it held
    resumed = resumed_from(subset)  # a full sample of 64: the 8 replace, or not
    assert resumed.reservoir is not None
    assert len(resumed.reservoir) == resumed.reservoir.capacity == 64
    # ... but a judge that needs 128 (a larger batch) could never judge on it: not used
    resumed = resumed_from(subset, CollapseGuard(0.0, 5, min_window=128))
    assert resumed.reservoir is not None and len(resumed.reservoir) == 8
    assert resumed.reservoir.capacity == 1024 and "64 rows stored, 128 needed" in caplog.text


def test_the_stored_sample_is_bounded_in_bytes_and_resumed_at_its_size():
    r = InputReservoir(rows=100, horizon=1000, seed=3)
    r.add(np.arange(300, dtype=np.float32).reshape(100, 3))
    small = r.sample(max_bytes=10 * 12)  # ten rows of 3 float32
    assert small.shape == (10, 3) and len(np.unique(small[:, 0])) == 10
    assert set(small[:, 0].tolist()) <= set(r.inputs()[:, 0].tolist())
    back = InputReservoir(rows=100, horizon=1000)
    back.resume(small, held=100)  # full at the subset's size: a burst replaces the same share
    assert len(back) == back.capacity == 10
    assert set(back.inputs()[:, 0].tolist()) == set(small[:, 0].tolist())


def test_a_subsampled_sample_keeps_its_rows_distinct_over_restarts():
    # 784-feature rows: 1 MiB holds 334 of the 1,024. Padded back with repeats, a healthy
    # model's labels on them read as collapsed, and each restart stored fewer distinct rows
    # (334, 227, 171, ... 29 after a review's eight restarts).
    from oclust.model.snapshot import SAMPLE_HELD, Snapshot, pack_arrays, unpack_arrays

    rng = np.random.default_rng(0)
    r = InputReservoir(rows=1024, horizon=10_000)
    r.add(rng.normal(size=(1024, 784)).astype(np.float32))
    snap = Snapshot.create(pack_arrays({"w": np.zeros(1, np.float32)}), {})
    for _ in range(4):  # restart after restart, each with a batch between
        snap = r.store_in(snap)
        assert unpack_arrays(snap.weights)[SAMPLE_HELD].tolist() == [1024]
        r = InputReservoir(rows=1024, horizon=10_000)
        assert r.resume_from(snap, (784,)) is None
        assert len(r) == r.capacity == 334 == len(np.unique(r.inputs(), axis=0))
        r.add(rng.normal(size=(256, 784)).astype(np.float32))
    # fewer rows fit than the judge needs: nothing is stored, a resumed worker starts empty
    assert r.store_in(snap, min_rows=335).weights == snap.weights


def test_the_snapshot_judge_needs_passes_in_a_row_after_a_failure_and_sets_the_gauge(
    monkeypatch: pytest.MonkeyPatch,
):
    X = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    trainer = Trainer(OnlineClusterer(n_clusters=2, seed=0, hidden=(8,), latent_dim=4),
                      CollapseGuard(0.0, 5), WorkerMetrics())
    verdicts = iter([True, False, True, True, None, False, True, True, True, True])
    judged = []
    monkeypatch.setattr(trainer, "_judge", lambda snap: judged.append(snap) or next(verdicts))
    gauge = trainer.metrics.registry
    got = []
    for _ in range(10):
        trainer.step(Batch(X, np.full(64, -1)))  # a new model at each checkpoint
        got.append(trainer.publishable(trainer.snapshot({"t:0": 64})))
        assert gauge.get_sample_value("oclust_worker_collapsed") == (0 if got[-1] else 1)
    # a failure owes RECOVERY passes in a row; a judgement that cannot be made leaves it to the
    # guard
    assert got == [True, False, False, False, True, False, False, False, True, True]
    assert RECOVERY == 3 and len(judged) == 10
    # the same weights again (an idle stream's checkpoints) are not judged again: passes they
    # would get pay no debt
    verdicts = iter([False] + [True] * RECOVERY)
    trainer.step(Batch(X, np.full(64, -1)))
    again = [trainer.publishable(trainer.snapshot({"t:0": 64})) for _ in range(RECOVERY + 1)]
    assert again == [False] * (RECOVERY + 1) and len(judged) == 11


def test_the_reservoir_holds_enough_inputs_to_judge_a_large_k():
    X = np.random.default_rng(0).normal(size=(128, 4)).astype(np.float32)
    trainer = Trainer(OnlineClusterer(n_clusters=120, seed=0, hidden=(8,), latent_dim=4),
                      CollapseGuard(1.0, 5, min_window=128), WorkerMetrics())
    trainer.step(Batch(X, np.full(128, -1)))
    assert trainer.reservoir is not None and trainer.reservoir.capacity == 1200  # 10 K
    assert trainer.reservoir.horizon == 50_000  # 100 windows of 2,400 would be 240,000


def test_a_collapse_threshold_no_window_can_reach_is_refused(tmp_path):
    from typer.testing import CliRunner

    from oclust.service.cli import app
    from oclust.training_worker.resume import FaultMetrics, WorkerHalt, load_trainer
    from oclust.training_worker.trainer import TrainerHooks

    result = CliRunner().invoke(app, ["worker", "--metrics-port", "-1", "--n-clusters", "10",
                                      "--collapse-threshold", "2.4"])  # log 10 = 2.303
    assert result.exit_code == 2 and "at or above log K" in result.output, result.output
    assert WorkerSettings(topic="t", n_clusters=10, collapse_threshold=2.2)
    # a resumed snapshot's K wins over the settings': checked against it too
    clf = OnlineClusterer(n_clusters=4, latent_dim=4, seed=0)
    clf.partial_fit(np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32))
    store = DirectoryStore(str(tmp_path), "t")
    store.publish(clf.to_snapshot())
    s = WorkerSettings(topic="t", n_clusters=10, collapse_threshold=2.0)  # log 4 = 1.386
    with pytest.raises(WorkerHalt, match="resumed snapshot"):
        load_trainer(s, store, WorkerMetrics(), FaultMetrics(WorkerMetrics().registry),
                     TrainerHooks())


def test_a_model_that_refuses_every_batch_stops_the_worker():
    rng = np.random.default_rng(0)
    good = rng.normal(size=(32, 4)).astype(np.float32)
    huge = np.full((32, 4), 3e38, dtype=np.float32)  # finite; the model's distances overflow
    metrics = WorkerMetrics()
    clf = OnlineClusterer(n_clusters=2, latent_dim=4, standardize=False, seed=0)
    trainer = Trainer(clf, CollapseGuard(0.0, 5), metrics, max_refused=3)
    unlabelled = np.full(32, -1)
    assert trainer.step(Batch(good, unlabelled)) is not None
    for _ in range(2):  # refused batches are skipped and counted...
        assert trainer.step(Batch(huge, unlabelled)) is None
    assert trainer.step(Batch(good, unlabelled)) is not None  # ...a trained one ends the streak
    for _ in range(2):
        assert trainer.step(Batch(huge, unlabelled)) is None
    with pytest.raises(ModelBroken, match="refused 3 batches in a row"):
        trainer.step(Batch(huge, unlabelled))  # the third in a row: the model is broken
    assert metrics.registry.get_sample_value("oclust_worker_refused_batches_total") == 5
    assert trainer.failed_steps == 5


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
        "oclust_worker_collapsed", "oclust_worker_refused_batches",
        "oclust_worker_reservoir_hard_entropy_nats",
    } <= names  # counters are exported with a _total suffix


def test_undefined_gauges_read_nan_until_a_step_defines_them():
    # a fresh worker's served entropy read 0, a total collapse, before any data
    gauges = ("loss", "served_hard_entropy_nats", "served_kl_star_nats",
              "train_hard_entropy_nats", "train_kl_star_nats", "window_acc", "window_nmi")
    metrics = WorkerMetrics()
    reg = metrics.registry
    assert all(math.isnan(reg.get_sample_value(f"oclust_worker_{g}")) for g in gauges)
    X = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    clf = OnlineClusterer(n_clusters=2, latent_dim=4, hidden=(8,), seed=0, device="cpu")
    trainer = Trainer(clf, CollapseGuard(0.1, 5), metrics)
    assert trainer.step(Batch(X, np.arange(64) % 2)) is not None
    assert all(math.isfinite(reg.get_sample_value(f"oclust_worker_{g}")) for g in gauges)


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
    a.release()  # a's lapsed lease: releasing it must not free b's
    assert b.holder() == "b"
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


def test_init_reaches_a_fresh_model_not_a_resumed_one_and_unknown_seedings_are_refused(
    tmp_path, caplog
):

    from pydantic import ValidationError

    from oclust.training_worker.resume import FaultMetrics, fresh_model, load_trainer
    from oclust.training_worker.trainer import TrainerHooks

    assert fresh_model(WorkerSettings(topic="t", init="inputs"), "cpu").init == "inputs"
    assert fresh_model(WorkerSettings(topic="t"), "cpu").init == "auto"  # the model's default
    with pytest.raises(ValidationError, match="unknown seeding 'spectral'; choose from"):
        WorkerSettings(topic="t", init="spectral")
    X = np.random.default_rng(0).normal(size=(256, 6)).astype(np.float32)
    store = DirectoryStore(str(tmp_path), "t")
    store.publish(OnlineClusterer(4, latent_dim=4, hidden=(8,), seed=0).partial_fit(X)
                  .to_snapshot())
    caplog.set_level(logging.WARNING, logger="oclust.training_worker.resume")
    metrics = WorkerMetrics()
    trainer = load_trainer(WorkerSettings(topic="t", n_clusters=4, init="inputs"), store,
                           metrics, FaultMetrics(metrics.registry), TrainerHooks(), "cpu")
    assert trainer.model.init == "kmeans"  # the snapshot's
    assert "seeded already (init kmeans; --init inputs applies to a fresh model)" in caplog.text
