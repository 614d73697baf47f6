"""Metrics: the paper's appendix D example and the properties the monitor relies on."""

import math

import numpy as np
import pytest

from oclust.model import metrics

D1 = np.array([[0.98, 0.01, 0.01], [0.98, 0.01, 0.01], [0.49, 0.50, 0.01], [0.49, 0.01, 0.50]])
D2 = np.array([[0.34, 0.33, 0.33]] * 4)


def test_appendix_d_hard_histogram():
    hist = metrics.cluster_distribution(D1.argmax(1), 3)
    np.testing.assert_allclose(hist, [0.5, 0.25, 0.25])
    assert metrics.hard_entropy(D1.argmax(1), 3) == pytest.approx(1.5 * math.log(2))


def test_appendix_d_soft_marginal_hides_collapse():
    assert metrics.soft_entropy(D2) == pytest.approx(math.log(3), abs=1e-3)
    np.testing.assert_allclose(metrics.cluster_distribution(D2.argmax(1), 3), [1, 0, 0])
    assert metrics.hard_entropy(D2.argmax(1), 3) == 0.0
    uniform = np.full(3, 1 / 3)
    assert metrics.kl_star_hard(D2.argmax(1), 3, prior=uniform) == pytest.approx(math.log(3))
    assert metrics.kl_star_soft(D2, prior=uniform) < 1e-3


def test_kl_star_is_finite_with_empty_reference_bins_and_zero_for_equal():
    assert math.isfinite(metrics.kl_star(np.array([0.5, 0.5]), np.array([1.0, 0.0])))
    p = np.array([0.2, 0.3, 0.5])
    assert metrics.kl_star(p, p) == pytest.approx(0.0)


def test_js_divergence_bounded_and_symmetric():
    p, q = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert metrics.js_divergence(p, q) == pytest.approx(math.log(2))
    a, b = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.3, 0.6])
    assert metrics.js_divergence(a, b) == pytest.approx(metrics.js_divergence(b, a))


def test_acc_uses_hungarian_matching():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert metrics.cluster_acc(y, np.array([2, 2, 0, 0, 1, 1])) == 1.0
    assert metrics.cluster_acc(y, np.array([0, 0, 0, 0, 0, 0])) == pytest.approx(1 / 3)
    assert metrics.nmi(y, np.array([1, 1, 2, 2, 0, 0])) == pytest.approx(1.0)
    assert metrics.ari(y, np.array([1, 1, 2, 2, 0, 0])) == pytest.approx(1.0)


def test_kl_star_hard_aligns_clusters_to_imbalanced_classes():
    y = np.array([0] * 6 + [1] * 3 + [2])
    perfect_but_permuted = (y + 1) % 3
    assert metrics.kl_star_hard(perfect_but_permuted, 3, y) == pytest.approx(0.0)
    assert metrics.kl_star_hard(np.zeros_like(y), 3, y) > 0.5


def test_kl_star_counts_every_class_when_there_are_fewer_clusters() -> None:
    y = np.repeat(np.arange(10), 5)  # ten balanced classes
    one = np.zeros_like(y)  # one cluster: all of the mass in one of ten classes
    assert metrics.kl_star_hard(one, 1, y) == pytest.approx(math.log(10))  # it was 0
    assert metrics.kl_star_soft(np.ones((50, 1)), y) == pytest.approx(math.log(10))
    five = y // 2  # five clusters, two classes each: half of the classes get nothing
    assert metrics.kl_star_hard(five, 5, y) == pytest.approx(math.log(2))
    assert metrics.kl_star_hard(y, 10, y) == pytest.approx(0.0)  # as many: unchanged


def test_acc_takes_any_labels_and_needs_one_of_each_per_sample() -> None:
    perfect = [([-1, -1, 0, 0], [0, 0, 1, 1]),  # was 0.5: np.add.at wrapped -1 round
               ([0, 0, 1, 1], [-1, -1, 5, 5]),  # a KeyError
               ([0, 10**6], [0, 1]),  # a MemoryError: a 10**6 x 10**6 matrix
               (["a", "b"], [0, 1])]
    for y_true, y_pred in perfect:
        assert metrics.cluster_acc(np.array(y_true), np.array(y_pred)) == 1.0
    assert metrics.cluster_acc(np.array([7, 7, 7, 3]), np.array([-2, 9, 9, 9])) == 0.5
    with pytest.raises(ValueError, match="y_true has 3 labels and y_pred 2"):  # an IndexError
        metrics.cluster_acc(np.array([0, 1, 1]), np.array([0, 1]))


def test_kl_star_refuses_labels_outside_its_bins() -> None:
    with pytest.raises(ValueError, match=r"clusters outside 0\.\.1"):  # 5s were dropped silently
        metrics.kl_star_hard(np.array([0, 0, 5, 5]), 2)
    with pytest.raises(ValueError, match=r"clusters outside 0\.\.1"):
        metrics.kl_star_hard(np.array([-1, 0]), 2)
    with pytest.raises(ValueError, match="non-negative"):  # a bincount error
        metrics.kl_star_hard(np.array([0, 0, 1, 1]), 2, np.array([-1, -1, 0, 0]))
    with pytest.raises(ValueError, match="non-negative"):
        metrics.kl_star_soft(np.full((4, 2), 0.5), np.array([-1, -1, 0, 0]))
    with pytest.raises(ValueError, match="y_true has 3 labels and y_pred 4"):
        metrics.kl_star_hard(np.array([0, 0, 1, 1]), 2, np.array([0, 1, 1]))
