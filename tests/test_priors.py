"""Priors for imbalanced streams and the imbalanced evaluation."""

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from model import OnlineClusterer
from model.evaluation import evaluate, imbalance_profile, subsample_imbalanced
from model.priors import OnlinePrior, resolve_prior
from service.cli import app

TRUE = np.array([0.55, 0.3, 0.15])


def _imbalanced_stream(n: int = 1500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated Gaussian blobs with frequencies TRUE."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0] * 4, [6.0] * 4, [-6.0, 6.0, -6.0, 6.0]])
    y = rng.choice(3, size=n, p=TRUE)
    return (centres[y] + rng.normal(size=(n, 4))).astype(np.float32), y


def test_estimator_converges_to_the_label_frequencies():
    est = OnlinePrior(3, decay=0.95)
    rng = np.random.default_rng(1)
    np.testing.assert_allclose(est.probs, np.full(3, 1 / 3))  # uniform before any data
    for _ in range(300):
        p = est.update(rng.choice(3, size=256, p=TRUE))
    np.testing.assert_allclose(p, TRUE, atol=0.02)
    assert p.sum() == pytest.approx(1.0)


def test_estimator_tracks_a_shift_and_keeps_a_floor():
    est = OnlinePrior(2, decay=0.9, min_share=0.2)
    for _ in range(200):
        est.update(np.zeros(100, dtype=np.int64))  # cluster 1 never seen
    assert est.probs[1] == pytest.approx(0.1 / (1 + 0.1), rel=0.05)  # floor 0.2 / K, renormalised
    for _ in range(200):
        est.update(np.ones(100, dtype=np.int64))
    assert est.probs[1] > 0.85


def test_estimator_state_round_trip_and_errors():
    est = OnlinePrior(3)
    est.update(np.array([0, 0, 1]))
    again = OnlinePrior.from_state(3, est.state())
    np.testing.assert_array_equal(again.probs, est.probs)
    with pytest.raises(ValueError, match="counts"):
        OnlinePrior.from_state(4, est.state())
    with pytest.raises(ValueError, match="labels"):
        est.update(np.array([3]))
    with pytest.raises(ValueError, match="decay"):
        OnlinePrior(3, decay=1.0)


@pytest.mark.parametrize(
    ("prior", "match"),
    [("learned", "'uniform', 'online'"), ([0.5, 0.3, 0.2], "length"), (["a", "b"], "numbers")],
)
def test_bad_prior_options_are_clear_errors(prior, match):
    with pytest.raises(ValueError, match=match):
        resolve_prior(prior, 2)
    with pytest.raises(ValueError, match=match):
        OnlineClusterer(n_clusters=2, prior=prior).validate_params()


def test_online_prior_converges_to_the_true_frequencies_on_an_imbalanced_stream():
    X, _ = _imbalanced_stream()
    clf = OnlineClusterer(3, prior="online", latent_dim=8, hidden=(16,), seed=0)
    clf.fit(X, epochs=6, batch_size=150)
    est = np.sort(clf.prior_)[::-1]
    np.testing.assert_allclose(est, TRUE, atol=0.04)
    # The estimate is what the regulariser sees as its prior.
    np.testing.assert_allclose(clf.log_prior_.cpu().numpy(), np.log(clf.prior_), rtol=1e-5)
    # And the served clusters keep the imbalance.
    share = np.sort(np.bincount(clf.predict(X), minlength=3) / len(X))[::-1]
    np.testing.assert_allclose(share, TRUE, atol=0.04)


def test_online_prior_is_in_the_manifest_and_restored():
    X, _ = _imbalanced_stream(n=600)
    clf = OnlineClusterer(3, prior="online", latent_dim=8, hidden=(16,), seed=0)
    clf.fit(X, epochs=2, batch_size=150)
    snap = clf.to_snapshot()
    assert snap.manifest["prior_mode"] == "online"
    np.testing.assert_allclose(snap.manifest["prior"], clf.prior_)
    clone = OnlineClusterer.from_snapshot(snap)
    np.testing.assert_allclose(clone.prior_, clf.prior_)
    a, b = clf.partial_fit(X[:150]).last_step_, clone.partial_fit(X[:150]).last_step_
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(clone.prior_, clf.prior_)


def test_fixed_and_uniform_modes_in_the_manifest():
    X, _ = _imbalanced_stream(n=300)
    for prior, mode in ((None, "uniform"), ("uniform", "uniform"), (list(TRUE), "fixed")):
        clf = OnlineClusterer(3, prior=prior, latent_dim=8, hidden=(16,), seed=0)
        clf.partial_fit(X)
        m = clf.to_snapshot().manifest
        assert m["prior_mode"] == mode and m["prior_state"] is None
        clone = OnlineClusterer.from_snapshot(clf.to_snapshot())
        assert clone.to_snapshot().manifest["prior_mode"] == mode
        np.testing.assert_allclose(clone.prior_, clf.prior_)


def test_imbalance_profiles_match_the_paper():
    np.testing.assert_allclose(imbalance_profile("imb1", 10), [1] * 6 + [0.95, 0.9, 0.85, 0.8])
    np.testing.assert_allclose(imbalance_profile("imb2", 10), 1 - 0.05 * np.arange(10))
    np.testing.assert_allclose(imbalance_profile("imb3", 10), 1 - 0.1 * np.arange(10))
    p7 = imbalance_profile("imb3", 7)  # scaled to K classes by linear interpolation
    assert p7[0] == 1.0 and p7[-1] == pytest.approx(0.1) and np.all(np.diff(p7) < 0)
    with pytest.raises(ValueError, match="unknown imbalance"):
        imbalance_profile("imb9", 10)


def test_subsample_keeps_the_profile_share_of_each_class():
    y = np.repeat(np.arange(4), 100)
    X = np.arange(400, dtype=np.float32)[:, None]
    Xs, ys = subsample_imbalanced(X, y, "imb3", seed=0)
    assert np.bincount(ys).tolist() == [100, 70, 40, 10]
    np.testing.assert_array_equal(y[Xs[:, 0].astype(int)], ys)  # rows stay paired
    other = subsample_imbalanced(X, y, "imb3", seed=1)[0]
    assert not np.array_equal(Xs, other)


@pytest.mark.parametrize("prior", ["true", "online", "uniform"])
def test_evaluate_runs_imbalanced_with_each_prior(prior):
    res = evaluate("segments", ["ca"], seeds=1, epochs=1, imbalance="imb3", prior=prior)
    scores = res["ca"][0]
    assert 0.0 <= scores["acc"] <= 1.0 and scores["kl_star_hard"] >= 0.0
    assert math.isfinite(scores["nmi"])


def test_evaluate_rejects_bad_imbalance_and_prior():
    with pytest.raises(ValueError, match="imbalance"):
        evaluate("segments", ["ca"], seeds=1, epochs=1, imbalance="imb7")
    with pytest.raises(ValueError, match="prior"):
        evaluate("segments", ["ca"], seeds=1, epochs=1, prior="guess")


def test_eval_cli_accepts_imbalance_prior_and_the_seed_methods():
    result = CliRunner().invoke(
        app,
        ["eval", "--dataset", "segments", "-r", "cm,ckm", "--seeds", "1", "--epochs", "1",
         "--imbalance", "imb3", "--prior", "online"],
    )
    assert result.exit_code == 0, result.output
    for text in ("imb3, prior online", "cm", "ckm", "KMeans"):
        assert text in result.output


@pytest.mark.parametrize(
    ("args", "hint"), [(["--imbalance", "imb5"], "imbalance"), (["--prior", "guess"], "prior")]
)
def test_eval_cli_rejects_bad_imbalance_and_prior(args, hint):
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code != 0 and hint in result.output
