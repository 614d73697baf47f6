"""The fast combination assignment must return exactly the labels of the naive greedy loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from oclust.model.assign import combination_assignment
from oclust.model.assign_reference import reference_assignment
from oclust.model.assign_reference import reference_assignment_vectorised as numpy_reference


@st.composite
def ca_problems(draw: st.DrawFn) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Random (distances, sigma, log_prior) covering scales, ties, equal columns and priors."""
    n = draw(st.integers(0, 60))
    k = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["scaled", "small_ints", "equal_columns", "signed", "near_ulp"]))
    if kind == "scaled":  # continuous values from tiny to huge
        scale = 10.0 ** draw(st.integers(-12, 250))
        d = rng.random((n, k)) * scale
    elif kind == "small_ints":  # many exact ties in D and in costs
        d = rng.integers(0, draw(st.integers(1, 4)), size=(n, k)).astype(np.float64)
    elif kind == "equal_columns":  # clusters indistinguishable by distance
        col = rng.integers(0, 3, size=(n, 1)).astype(np.float64)
        d = np.repeat(col, k, axis=1)
        d[:, : draw(st.integers(0, k))] += rng.integers(0, 2, size=(n, 1))
    elif kind == "signed":  # arbitrary finite costs, not only squared distances
        d = rng.normal(size=(n, k)) * 10.0 ** draw(st.integers(-3, 6))
    else:  # distinct distances that round to equal costs once the penalty is large
        d = 1.0 + rng.integers(0, 6, size=(n, k)) * np.finfo(np.float64).eps
    sigma = draw(
        st.one_of(
            st.just(0.0),
            st.sampled_from([1e-12, 1.0, 100.0, 1e4]),
            st.floats(0.0, 1e4, allow_nan=False, allow_infinity=False),
        )
    )
    prior_kind = draw(st.sampled_from(["none", "random", "uniform", "peaked"]))
    if prior_kind == "none":
        log_prior = None
    elif prior_kind == "uniform":
        log_prior = np.full(k, -math.log(k))
    else:
        p = rng.random(k) + 1e-3
        if prior_kind == "peaked":
            p = p**8
        log_prior = np.log(p / p.sum())
    return d, sigma, log_prior


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ca_problems())
def test_matches_reference_loop(problem: tuple[np.ndarray, float, np.ndarray | None]) -> None:
    d, sigma, log_prior = problem
    got = combination_assignment(d, sigma, log_prior)
    assert got.dtype == np.int64
    assert got.shape == (d.shape[0],)
    np.testing.assert_array_equal(got, reference_assignment(d, sigma, log_prior))


def test_tie_after_rounding_goes_to_lowest_row() -> None:
    # in cluster 0 row 1 has the smaller distance, but both costs round to 101.0 once the
    # penalty (100) is added: the naive loop takes the lowest row, 0, and the raised penalty
    # then sends row 1 to cluster 1 (cost 101.5 < 101 + log 2)
    eps = np.finfo(np.float64).eps
    d = np.array([[1.0 + eps, 1.5], [1.0, 1.5]])
    log_prior = np.array([-100.0, -100.0])
    assert 1.0 + eps + 100.0 == 1.0 + 100.0
    expected = reference_assignment(d, 1.0, log_prior)
    assert expected.tolist() == [0, 1]
    np.testing.assert_array_equal(combination_assignment(d, 1.0, log_prior), expected)


def test_tie_across_clusters_goes_to_lowest_row_then_cluster() -> None:
    # cluster 1's best row (0) ties with cluster 0's best row (2): row 0 must win, in cluster 1;
    # then row 1 costs 1 in both clusters: the lowest cluster wins
    d = np.array([[9.0, 1.0], [1.0, 1.0], [1.0, 9.0]])
    got = combination_assignment(d, 0.0)
    np.testing.assert_array_equal(got, reference_assignment(d, 0.0))
    assert got.tolist() == [1, 0, 0]


def test_collapsed_batch_matches_reference() -> None:
    # a collapsed encoder maps every sample to the same latent: every column is one tied block
    row = np.array([3.0, 1.0, 2.0, 1.0, 5.0, 1.0])
    d = np.repeat(row[None, :], 150, axis=0)
    got = combination_assignment(d, 0.5)
    np.testing.assert_array_equal(got, reference_assignment(d, 0.5))
    assert len(set(got.tolist())) > 1  # the penalty spreads the collapsed batch


def test_empty_batch_and_single_cluster() -> None:
    assert combination_assignment(np.zeros((0, 3)), 1.0).shape == (0,)
    assert combination_assignment(np.zeros((0, 3)), 1.0).dtype == np.int64
    np.testing.assert_array_equal(
        combination_assignment(np.arange(5.0)[:, None], 3.0), np.zeros(5, dtype=np.int64)
    )


def test_sigma_zero_is_rowwise_argmin() -> None:
    rng = np.random.default_rng(0)
    d = rng.integers(0, 5, size=(200, 7)).astype(np.float64)  # ties: argmin takes lowest k
    np.testing.assert_array_equal(combination_assignment(d, 0.0), np.argmin(d, axis=1))


def test_huge_sigma_balances_counts() -> None:
    rng = np.random.default_rng(1)
    d = rng.random((203, 10))
    d[:, 0] -= 1.0  # every point prefers cluster 0
    counts = np.bincount(combination_assignment(d, 1e6), minlength=10)
    assert counts.max() - counts.min() <= 1
    assert np.bincount(combination_assignment(d, 0.0), minlength=10)[0] == 203  # collapse


def test_prior_keeps_imbalance() -> None:
    rng = np.random.default_rng(2)
    d = rng.random((300, 3))
    prior = np.array([0.6, 0.3, 0.1])
    counts = np.bincount(combination_assignment(d, 1e6, np.log(prior)), minlength=3)
    np.testing.assert_allclose(counts / 300, prior, atol=0.01)


def test_torch_tensor_input_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(3)
    t = torch.rand(50, 6, generator=gen, requires_grad=True) * 4.0  # float32, in a graph
    lp_t = torch.log_softmax(torch.rand(6, generator=gen), dim=0)
    d = t.detach().double().numpy()
    lp = lp_t.double().numpy()
    expected = combination_assignment(d, 2.0, lp)
    np.testing.assert_array_equal(combination_assignment(t, 2.0, lp_t), expected)
    np.testing.assert_array_equal(expected, reference_assignment(d, 2.0, lp))


def test_list_and_integer_input() -> None:
    d = [[3, 1], [2, 2], [0, 5]]
    np.testing.assert_array_equal(
        combination_assignment(d, 1.0), reference_assignment(np.array(d, float), 1.0)
    )


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_distances_rejected(bad: float) -> None:
    d = np.ones((4, 3))
    d[2, 1] = bad
    with pytest.raises(ValueError, match=r"finite.*row 2, column 1"):
        combination_assignment(d, 1.0)


@pytest.mark.parametrize("sigma", [-1e-9, -1.0, math.nan, math.inf, "abc"])
def test_bad_sigma_rejected(sigma: object) -> None:
    with pytest.raises(ValueError, match="sigma"):
        combination_assignment(np.ones((3, 2)), sigma)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "log_prior", [np.zeros(2), np.zeros(4), np.zeros((3, 1)), np.array([0.0, -np.inf, 0.0])]
)
def test_bad_log_prior_rejected(log_prior: np.ndarray) -> None:
    with pytest.raises(ValueError, match="log_prior"):
        combination_assignment(np.ones((5, 3)), 1.0, log_prior)


@pytest.mark.parametrize(
    "distances", [np.ones(4), np.ones((2, 3, 4)), np.float64(1.0), np.ones((4, 0))]
)
def test_bad_shape_rejected(distances: np.ndarray) -> None:
    with pytest.raises(ValueError, match="distances"):
        combination_assignment(distances, 1.0)


@pytest.mark.parametrize(
    "distances",
    [np.array([["a", "b"]]), np.ones((2, 2)) * 1j, torch.ones(2, 2, dtype=torch.complex64)],
)
def test_non_real_distances_rejected(distances: np.ndarray) -> None:
    with pytest.raises(ValueError, match="distances must be real"):
        combination_assignment(distances, 1.0)


def test_numpy_reference_matches_reference_loop() -> None:
    rng = np.random.default_rng(4)
    d = rng.integers(0, 3, size=(40, 5)).astype(np.float64)
    lp = np.log(rng.dirichlet(np.ones(5)))
    np.testing.assert_array_equal(numpy_reference(d, 1.0, lp), reference_assignment(d, 1.0, lp))


def _squared_distances(n: int, n_clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, mu = rng.normal(size=(n, 128)), rng.normal(size=(n_clusters, 128))
    return ((z[:, None, :] - mu[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("sigma", [0.0, 1.0, 100.0, 1e4])
def test_large_random_batch_matches_reference(sigma: float) -> None:
    # N=1024, K=100: columns are sorted lazily and deep, and late recomputes scan the rows left
    d = _squared_distances(1024, 100, seed=int(sigma))
    np.testing.assert_array_equal(combination_assignment(d, sigma), numpy_reference(d, sigma))


def test_large_batch_with_many_ties_and_prior_matches_reference() -> None:
    # three distinct distances over 800 x 60 entries: long equal-distance blocks in every column
    rng = np.random.default_rng(5)
    d = rng.integers(0, 3, size=(800, 60)).astype(np.float64)
    lp = np.log(rng.dirichlet(np.ones(60)))
    for sigma in (0.5, 3.0):
        np.testing.assert_array_equal(
            combination_assignment(d, sigma, lp), numpy_reference(d, sigma, lp)
        )


def test_large_collapsed_batch_and_constant_columns_match_reference() -> None:
    d = np.repeat(_squared_distances(1, 100, seed=6), 1024, axis=0)  # collapsed encoder
    np.testing.assert_array_equal(combination_assignment(d, 100.0), numpy_reference(d, 100.0))
    mixed = _squared_distances(512, 40, seed=7)
    mixed[:, ::3] = mixed[0, ::3]  # every third column constant, the others random
    np.testing.assert_array_equal(combination_assignment(mixed, 50.0), numpy_reference(mixed, 50.0))


def test_rounding_ties_deep_in_columns_match_reference() -> None:
    # distinct distances that tie once a large penalty is added, in long columns
    rng = np.random.default_rng(8)
    d = 1.0 + rng.integers(0, 6, size=(700, 30)) * np.finfo(np.float64).eps
    lp = np.full(30, -1e3)
    np.testing.assert_array_equal(combination_assignment(d, 1.0, lp), numpy_reference(d, 1.0, lp))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ca_problems(), st.integers(100, 700))
def test_larger_batches_match_reference(
    problem: tuple[np.ndarray, float, np.ndarray | None], n: int
) -> None:
    # the same kinds of inputs, tiled up to n rows so that columns need more than one split
    d, sigma, log_prior = problem
    assume(d.shape[0] > 0)
    rng = np.random.default_rng(n)
    d = d[rng.integers(0, d.shape[0], size=n)] + 0.0
    np.testing.assert_array_equal(
        combination_assignment(d, sigma, log_prior), numpy_reference(d, sigma, log_prior)
    )


def test_threads_do_not_share_work_arrays() -> None:
    # the kernel releases the GIL and reuses per-thread work arrays: concurrent calls on
    # different batches must each give their own sequential answer
    from concurrent.futures import ThreadPoolExecutor

    problems = [_squared_distances(300 + 50 * s, 20 + s, seed=s) for s in range(8)]
    expected = [combination_assignment(d, 10.0) for d in problems]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda d: combination_assignment(d, 10.0), problems))
            for g, e in zip(got, expected, strict=True):
                np.testing.assert_array_equal(g, e)
