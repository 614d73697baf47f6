"""Priors for imbalanced streams and the imbalanced evaluation."""

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from oclust.model import OnlineClusterer
from oclust.model.evaluation import evaluate, imbalance_profile, subsample_imbalanced
from oclust.model.priors import OnlinePrior, cap_kl_to_uniform, resolve_prior
from oclust.service.cli import app

TRUE = np.array([0.55, 0.3, 0.15])


def _imbalanced_stream(n: int = 1500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated Gaussian blobs with frequencies TRUE."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0] * 4, [6.0] * 4, [-6.0, 6.0, -6.0, 6.0]])
    y = rng.choice(3, size=n, p=TRUE)
    return (centres[y] + rng.normal(size=(n, 4))).astype(np.float32), y


def _blob_distances(
    rng: np.random.Generator, shares: np.ndarray, n: int = 256, closer: float = 1.0
) -> np.ndarray:
    """Squared distances of a batch of 1-D blobs at 0, 10, 20, ... to those centres.

    The points of cluster 0 lie ``closer`` times as far from their centre as the others do.
    """
    k = len(shares)
    centres = 10.0 * np.arange(k)
    y = rng.choice(k, size=n, p=shares)
    x = centres[y] + rng.normal(size=n) * np.where(y == 0, closer, 1.0)
    return (x[:, None] - centres) ** 2


def test_estimator_follows_the_soft_responsibilities_shrunk_toward_uniform():
    est = OnlinePrior(3, decay=0.95, shrink=0.2, max_kl=1.0, warmup=0)
    rng = np.random.default_rng(1)
    np.testing.assert_allclose(est.probs, np.full(3, 1 / 3))  # uniform before any data
    for _ in range(300):
        p = est.update_from_distances(_blob_distances(rng, TRUE), sigma=1.0)
    np.testing.assert_allclose(p, 0.8 * TRUE + 0.2 / 3, atol=0.02)
    assert p.sum() == pytest.approx(1.0)


def test_estimator_caps_kl_to_uniform_and_waits_for_the_warmup():
    est = OnlinePrior(2, decay=0.9, shrink=0.0, max_kl=0.05, warmup=1000)
    resp = np.tile([1.0, 0.0], (100, 1))  # every sample certain of cluster 0
    for _ in range(9):
        est.update(resp)
    np.testing.assert_array_equal(est.probs, [0.5, 0.5])  # 900 samples: still warming up
    est.update(resp)
    assert est.warm and est.probs[0] > 0.6
    assert est.kl_to_uniform() == pytest.approx(0.05, abs=1e-6)  # projected onto the cap
    for p in (np.array([0.99, 0.01]), np.array([0.7, 0.2, 0.1]), np.array([0.5, 0.5])):
        q = cap_kl_to_uniform(p, 0.02)
        assert math.log(len(p)) + float(np.sum(q * np.log(q))) <= 0.02 + 1e-9
        assert q.sum() == pytest.approx(1.0) and np.argmax(q) == np.argmax(p)


def test_a_cluster_that_is_closer_does_not_take_over_the_prior():
    """One cluster's points 8% closer to its centroid: its share stays below twice the truth."""
    shares = np.full(10, 0.1)
    est = OnlinePrior(10, warmup=0)
    rng = np.random.default_rng(0)
    for _ in range(400):
        est.update_from_distances(_blob_distances(rng, shares, closer=0.92), sigma=10.0)
    assert est.probs[0] < 2 * shares[0]
    assert est.kl_to_uniform() <= est.max_kl


def test_a_closer_cluster_does_not_take_over_a_trained_model():
    """The same through training (CA shapes the latents): the estimate stays below 2x."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16))
    y = rng.integers(10, size=3000)
    X = centres[y] + rng.normal(size=(3000, 16)) * np.where(y == 0, 0.92, 1.0)[:, None]
    clf = OnlineClusterer(10, prior="online", latent_dim=16, hidden=(64,), seed=0)
    clf.fit(X.astype(np.float32), epochs=8, batch_size=256)
    pred = clf.predict(X.astype(np.float32))
    closer = np.bincount(pred[y == 0], minlength=10).argmax()  # the cluster of blob 0
    assert clf.prior_[closer] < 2 * 0.1
    assert np.mean(pred == closer) < 2 * 0.1
    assert clf.prior_estimator_.kl_to_uniform() <= clf.prior_estimator_.max_kl


def test_estimator_state_round_trip_versions_and_errors():
    est = OnlinePrior(3, warmup=0)
    est.update(np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
    state = est.state()
    assert state["version"] == 2 and state["seen"] == 2
    again = OnlinePrior.from_state(3, state)
    np.testing.assert_array_equal(again.probs, est.probs)
    assert (again.max_kl, again.shrink, again.warmup) == (est.max_kl, est.shrink, 0)
    # A version-1 state (discounted counts of CA's own labels, which can learn collapse) loads
    # with its settings but restarts the estimate: uniform until warm, nothing carried over.
    old = OnlinePrior.from_state(3, {"decay": 0.95, "alpha": 1.0, "min_share": 0.1,
                                     "counts": [95.0, 3.0, 2.0]})
    assert old.decay == 0.95 and not old.warm and old.seen == 0
    np.testing.assert_array_equal(old.counts, np.zeros(3))
    np.testing.assert_array_equal(old.probs, np.full(3, 1 / 3))
    with pytest.raises(ValueError, match="counts"):  # a v1 state that does not fit K still fails
        OnlinePrior.from_state(4, {"counts": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="counts"):
        OnlinePrior.from_state(4, state)
    with pytest.raises(ValueError, match="version"):
        OnlinePrior.from_state(3, state | {"version": 9})
    with pytest.raises(ValueError, match="responsibilities"):
        est.update(np.array([3]))
    with pytest.raises(ValueError, match="rows that sum to 1"):
        est.update(np.array([[0.9, 0.9, 0.0]]))
    with pytest.raises(ValueError, match="distances"):
        est.update_from_distances(np.array([[np.nan, 1.0, 2.0]]), sigma=1.0)
    for bad in ({"decay": 1.0}, {"shrink": 1.5}, {"max_kl": -0.1}, {"warmup": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            OnlinePrior(3, **bad)


@pytest.mark.parametrize(
    ("prior", "match"),
    [("learned", "'uniform', 'online'"), ([0.5, 0.3, 0.2], "length"), (["a", "b"], "numbers")],
)
def test_bad_prior_options_are_clear_errors(prior, match):
    with pytest.raises(ValueError, match=match):
        resolve_prior(prior, 2)
    with pytest.raises(ValueError, match=match):
        OnlineClusterer(n_clusters=2, prior=prior).validate_params()


def test_online_prior_is_bounded_and_fed_back_on_an_imbalanced_stream():
    X, _ = _imbalanced_stream()
    clf = OnlineClusterer(3, prior="online", latent_dim=8, hidden=(16,), seed=0)
    clf.fit(X, epochs=6, batch_size=150)
    est = clf.prior_estimator_
    assert est.warm and not np.allclose(clf.prior_, 1 / 3)  # in use after the warm-up
    assert est.kl_to_uniform() <= est.max_kl + 1e-9
    assert clf.prior_.min() >= est.shrink / 3  # the shrinkage floor
    # The estimate is what the regulariser sees as its prior.
    np.testing.assert_allclose(clf.log_prior_.cpu().numpy(), np.log(clf.prior_), rtol=1e-5)


def test_the_kl_cap_is_configurable_and_survives_a_snapshot():
    X, _ = _imbalanced_stream()
    caps = {}
    for cap in (1.0, 0.0):
        params = {"max_kl": cap, "warmup": 0, "shrink": 0.0}
        clf = OnlineClusterer(3, prior="online", prior_params=params, latent_dim=8,
                              hidden=(16,), seed=0)
        clf.fit(X, epochs=6, batch_size=150)
        caps[cap] = clf.prior_estimator_.kl_to_uniform()
        assert clf.prior_estimator_.max_kl == cap and caps[cap] <= cap + 1e-9
        clone = OnlineClusterer.from_snapshot(clf.to_snapshot())
        assert clone.prior_params["max_kl"] == cap and clone.prior_estimator_.max_kl == cap
    assert caps[0.0] <= 1e-12 < caps[1.0]  # the tighter cap binds
    # numpy numbers are plain numbers in the (JSON) manifest
    clf = OnlineClusterer(3, prior="online", latent_dim=8, hidden=(16,), seed=0,
                          prior_params={"max_kl": np.float32(0.2), "warmup": np.int64(0)})
    state = clf.partial_fit(X[:150]).to_snapshot().manifest["prior_state"]
    assert state["max_kl"] == pytest.approx(0.2) and type(state["max_kl"]) is float
    for bad, match in (({"cap": 1}, "unknown 'cap'"), ({"max_kl": -1}, "non-negative"),
                       ([0.1], "must be a dict")):
        with pytest.raises(ValueError, match=match):
            OnlineClusterer(3, prior="online", prior_params=bad).validate_params()


def test_the_worker_and_train_take_the_kl_cap():
    from pydantic import ValidationError

    from oclust.training_worker.resume import fresh_model
    from oclust.training_worker.settings import WorkerSettings

    s = WorkerSettings(topic="t", n_clusters=3, prior="online", prior_max_kl=0.02)
    clf = fresh_model(s, "cpu").partial_fit(_imbalanced_stream(n=300)[0])
    assert clf.prior_estimator_.max_kl == 0.02
    with pytest.raises(ValidationError, match="add --prior online"):
        WorkerSettings(topic="t", n_clusters=3, prior_max_kl=0.02)
    r = CliRunner().invoke(app, ["train", "--dataset", "digits", "--prior-max-kl", "0.2"])
    assert r.exit_code == 2 and "add --prior online" in r.output, r.output


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


@pytest.mark.parametrize("param", ["random_state", "seed", "n_clusters", "regulariser"])
def test_evaluate_refuses_the_parameters_it_sets_for_each_run(param):
    # random_state=0 made every seed's run the same (std 0); the others raised TypeErrors
    with pytest.raises(ValueError, match=f"evaluate sets {param} itself"):
        evaluate("segments", ["ca"], seeds=2, epochs=1, **{param: 3})


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
