"""The service's sliding-window collapse/drift monitor, checked against brute force."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oclust.model import metrics
from oclust.service.monitor import AssignmentMonitor, smooth_prior


def _soft(labels: np.ndarray, k: int, sharp: float = 0.9) -> np.ndarray:
    """Soft rows that put ``sharp`` on the label and spread the rest."""
    rows = np.full((len(labels), k), (1 - sharp) / max(k - 1, 1))
    rows[np.arange(len(labels)), labels] = sharp
    return rows


def test_empty_window_reports_nothing_yet() -> None:
    mon = AssignmentMonitor(window=10)
    mon.configure(3, [1 / 3] * 3)
    s = mon.stats()
    assert (s.filled, s.samples_seen, s.counts, s.totals) == (0, 0, [0, 0, 0], [0, 0, 0])
    assert s.shares == [0.0, 0.0, 0.0]
    assert s.hard_entropy is s.kl_star is s.soft_entropy is s.drift_js is None
    assert s.hard_entropy_ratio is None


def test_uniform_prior_kl_is_log_k_minus_entropy() -> None:
    mon = AssignmentMonitor(window=100)
    mon.configure(4, [0.25] * 4)
    labels = np.array([0, 0, 0, 1, 2, 2, 0, 1])
    mon.record(labels, _soft(labels, 4))
    s = mon.stats()
    assert s.counts == [4, 2, 2, 0]
    assert s.shares == [0.5, 0.25, 0.25, 0.0]
    assert s.hard_entropy == pytest.approx(metrics.entropy([0.5, 0.25, 0.25]))
    assert s.hard_entropy_ratio == pytest.approx(s.hard_entropy / math.log(4))
    assert s.kl_star == pytest.approx(math.log(4) - s.hard_entropy)
    assert s.soft_entropy == pytest.approx(metrics.entropy(_soft(labels, 4).mean(axis=0)))


def test_design_worked_example_soft_uniform_but_hard_collapsed() -> None:
    """ARCHITECTURE.md §1.3: four rows of [.34, .33, .33] look uniform softly but are collapsed."""
    mon = AssignmentMonitor(window=4)
    mon.configure(3, [1 / 3] * 3)
    mon.record(np.zeros(4, dtype=np.int64), np.array([[0.34, 0.33, 0.33]] * 4))
    s = mon.stats()
    assert s.hard_entropy == 0.0 and s.hard_entropy_ratio == 0.0
    assert s.soft_entropy == pytest.approx(math.log(3), abs=1e-3)
    assert s.kl_star == pytest.approx(math.log(3))


def test_window_slides_and_keeps_only_the_last_w() -> None:
    mon = AssignmentMonitor(window=4)
    mon.configure(3, [1 / 3] * 3)
    first = np.array([0, 0, 0, 0, 0])
    last = np.array([1, 2, 2])
    mon.record(first, _soft(first, 3))
    mon.record(last, _soft(last, 3, sharp=0.6))
    s = mon.stats()
    assert s.filled == 4 and s.samples_seen == 8
    assert s.counts == [1, 1, 2]  # the last four labels: 0, 1, 2, 2
    assert s.totals == [5, 1, 2]
    window_soft = np.vstack([_soft(first, 3)[-1:], _soft(last, 3, sharp=0.6)])
    assert s.soft_entropy == pytest.approx(metrics.entropy(window_soft.mean(axis=0)))


def test_drift_compares_with_the_previous_window() -> None:
    mon = AssignmentMonitor(window=4)
    mon.configure(2, [0.5, 0.5])
    a = np.array([0, 0, 0, 1])
    mon.record(a, _soft(a, 2))
    assert mon.stats().drift_js is None  # no full reference window yet
    mon.record(a, _soft(a, 2))
    assert mon.stats().drift_js == pytest.approx(0.0)  # same histogram twice
    b = np.array([1, 1, 1, 1])
    mon.record(b, _soft(b, 2))
    want = metrics.js_divergence(np.array([0.0, 1.0]), np.array([0.75, 0.25]))
    assert mon.stats().drift_js == pytest.approx(want)
    assert 0 < want <= math.log(2)


def test_kl_star_stays_finite_against_a_zero_prior_entry() -> None:
    mon = AssignmentMonitor(window=10, prior_smoothing=0.01)
    mon.configure(2, [1.0, 0.0])
    labels = np.ones(5, dtype=np.int64)
    mon.record(labels, _soft(labels, 2))
    s = mon.stats()
    assert math.isfinite(s.kl_star)
    assert s.kl_star == pytest.approx(math.log(1 / 0.005))
    assert s.prior == pytest.approx([0.995, 0.005])


def test_smooth_prior_leaves_uniform_unchanged() -> None:
    assert smooth_prior([0.25] * 4, 0.1).tolist() == [0.25] * 4


def test_new_k_restarts_window_and_keeps_surviving_totals() -> None:
    mon = AssignmentMonitor(window=10)
    mon.configure(3, [1 / 3] * 3)
    labels = np.array([0, 1, 2, 2])
    mon.record(labels, _soft(labels, 3))
    mon.configure(3, [0.5, 0.25, 0.25])  # same K, new prior: the window stays
    assert mon.stats().filled == 4 and mon.stats().prior[0] > 0.49
    mon.configure(2, [0.5, 0.5])  # different K: fresh window, totals of clusters 0 and 1 kept
    s = mon.stats()
    assert (s.filled, s.samples_seen, s.totals, s.n_clusters) == (0, 0, [1, 1], 2)
    mon.record(labels, _soft(labels, 3))  # a stale 3-cluster answer is ignored
    assert mon.stats().samples_seen == 0


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        AssignmentMonitor(window=0)
    mon = AssignmentMonitor()
    with pytest.raises(ValueError, match="prior"):
        mon.configure(3, [0.5, 0.5])


def test_concurrent_records_are_all_counted() -> None:
    mon = AssignmentMonitor(window=50)
    mon.configure(4, [0.25] * 4)
    barrier = threading.Barrier(4)

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        barrier.wait()
        for _ in range(200):
            labels = rng.integers(0, 4, size=int(rng.integers(1, 5)))
            mon.record(labels, _soft(labels, 4))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = mon.stats()
    assert sum(s.totals) == s.samples_seen and s.filled == 50 and sum(s.counts) == 50


@settings(max_examples=60, deadline=None)
@given(
    window=st.integers(1, 12),
    k=st.integers(1, 5),
    chunks=st.lists(st.integers(1, 30), min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_matches_brute_force_over_the_whole_history(
    window: int, k: int, chunks: list[int], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    mon = AssignmentMonitor(window=window)
    prior = rng.dirichlet(np.ones(k))
    mon.configure(k, prior)
    all_labels, all_soft = [], []
    for n in chunks:
        labels = rng.integers(0, k, size=n)
        soft = rng.dirichlet(np.ones(k), size=n)
        mon.record(labels, soft)
        all_labels.append(labels)
        all_soft.append(soft)
    labels = np.concatenate(all_labels)
    soft = np.vstack(all_soft)
    s = mon.stats()
    current = labels[-window:]
    shares = np.bincount(current, minlength=k) / len(current)
    assert s.counts == np.bincount(current, minlength=k).tolist()
    assert s.totals == np.bincount(labels, minlength=k).tolist()
    assert s.hard_entropy == pytest.approx(metrics.entropy(shares))
    assert s.kl_star == pytest.approx(metrics.kl_star(shares, smooth_prior(prior, 0.01)))
    mean_soft = soft[-window:].mean(axis=0)
    assert s.soft_entropy == pytest.approx(metrics.entropy(mean_soft / mean_soft.sum()))
    if len(labels) >= 2 * window:
        ref = np.bincount(labels[-2 * window : -window], minlength=k) / window
        assert s.drift_js == pytest.approx(metrics.js_divergence(shares, ref), abs=1e-12)
    else:
        assert s.drift_js is None


def test_latent_map_ring_is_bounded_and_restarts_on_new_shapes() -> None:
    mon = AssignmentMonitor(window=10, map_size=4)
    mon.configure(2, [0.5, 0.5])
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 3)).astype(np.float32)
    for i in range(6):  # one at a time: the ring keeps the last 4, oldest first
        mon.record(np.array([i % 2]), np.full((1, 2), 0.5), z[i : i + 1])
    m = mon.latent_map(np.zeros((2, 3)))
    assert (m.capacity, m.latent_dim, len(m.points), m.clusters) == (4, 3, 4, [0, 1, 0, 1])
    assert len(m.centroids) == 2
    centred = z[2:] - z[2:].mean(axis=0)
    assert np.allclose(np.linalg.norm(m.points, axis=1) <= np.linalg.norm(centred, axis=1) + 1e-3,
                       True)
    assert mon.latent_map(np.zeros((2, 5))).centroids == []  # centroids of another size
    mon.record(np.array([1]), np.full((1, 2), 0.5), np.ones((1, 2), np.float32))
    assert mon.latent_map().latent_dim == 2 and len(mon.latent_map().points) == 1
    mon.configure(3, [1 / 3] * 3)  # a new K starts a fresh map
    assert mon.latent_map().points == []
    mon.record(np.array([0, 1]), np.full((2, 3), 1 / 3), np.array([[np.nan, 0], [1, 1]], "f4"))
    assert mon.latent_map().clusters == [1]  # non-finite latents are left out
