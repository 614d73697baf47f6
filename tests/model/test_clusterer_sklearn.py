"""OnlineClusterer as a scikit-learn estimator: check_estimator, clone, pipelines, fit."""

import json
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError
from sklearn.metrics import adjusted_rand_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

from oclust.model import OnlineClusterer, Snapshot, StepReport
from oclust.model.clusterer import EXPECTED_FAILED_CHECKS


def _small(**kw) -> OnlineClusterer:
    return OnlineClusterer(
        **{"n_clusters": 3, "latent_dim": 8, "hidden": (16,), "device": "cpu", **kw}
    )


def _blobs(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    X, y = make_blobs(n_samples=n, centers=3, n_features=5, random_state=0)
    return X, y


def test_check_estimator_passes_with_at_most_three_declared_failures():
    assert len(EXPECTED_FAILED_CHECKS) <= 3
    results = check_estimator(
        _small(), expected_failed_checks=EXPECTED_FAILED_CHECKS, on_fail=None, on_skip=None
    )
    failed = {r["check_name"]: repr(r["exception"]) for r in results if r["status"] == "failed"}
    assert not failed
    xfailed = {r["check_name"] for r in results if r["status"] == "xfail"}
    assert xfailed == set(EXPECTED_FAILED_CHECKS)  # each declared failure really fails
    assert sum(r["status"] == "passed" for r in results) > 40


def test_constructor_only_stores_parameters():
    prior = [0.2, 0.8]
    clf = OnlineClusterer(n_clusters=-5, regulariser="nope", prior=prior, hidden=(4,))
    assert clf.get_params()["prior"] is prior and clf.n_clusters == -5
    assert not clf.is_fitted and not hasattr(clf, "labels_")
    with pytest.raises(NotFittedError, match="not seen any data"):
        clf.predict(np.zeros((2, 3)))
    with pytest.raises(AttributeError):
        _ = clf.cluster_centers_


def test_fit_starts_over_and_sets_labels_and_centers():
    X, y = _blobs()
    clf = _small(random_state=0)
    assert clf.fit(X, epochs=3, batch_size=64) is clf
    labels, centers = clf.labels_.copy(), clf.cluster_centers_
    assert clf.samples_seen_ == 900 and clf.steps_ == 15
    np.testing.assert_array_equal(labels, clf.predict(X))
    assert adjusted_rand_score(y, labels) > 0.9
    # cluster_centers_ live in the latent space: predict is the nearest of them to transform(X)
    assert centers.shape == (3, 8)
    d = ((clf.transform(X)[:, None, :] - centers[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(d.argmin(1), labels)
    clf.partial_fit(X[:50])
    assert clf.samples_seen_ == 950
    clf.fit(X, epochs=3, batch_size=64)  # a fresh start: same as the first fit, not a 4th epoch
    assert clf.samples_seen_ == 900 and clf.steps_ == 15
    np.testing.assert_array_equal(clf.labels_, labels)
    np.testing.assert_allclose(clf.cluster_centers_, centers)


def test_fit_callback_gets_each_step_report():
    X, _ = _blobs(100)
    reports: list[StepReport] = []
    _small(random_state=0).fit(X, epochs=2, batch_size=40, callback=reports.append)
    assert [r.n for r in reports] == [40, 40, 20] * 2
    with pytest.raises(ValueError, match="epochs"):
        _small().fit(X, epochs=0)


def test_partial_fit_returns_self_with_last_step_and_labels():
    X, _ = _blobs(128)
    clf = _small(random_state=0)
    assert clf.partial_fit(X[:64]) is clf
    assert isinstance(clf.last_step_, StepReport) and clf.last_step_.n == 64
    np.testing.assert_array_equal(clf.labels_, clf.last_step_.served_labels)
    assert clf.n_features_in_ == 5 and clf.input_shape_ == (5,)
    with pytest.raises(ValueError, match="X has 4 features, but OnlineClusterer is expecting 5"):
        clf.partial_fit(X[:, :4])


def test_random_state_and_the_seed_alias_give_the_same_model():
    X, _ = _blobs(200)
    a = _small(random_state=3).fit(X, epochs=2, batch_size=50)
    b = _small(seed=3).fit(X, epochs=2, batch_size=50)
    c = _small(random_state=np.random.RandomState(3)).fit(X, epochs=2, batch_size=50)
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    assert a.to_snapshot().manifest["seed"] == 3 == b.to_snapshot().manifest["seed"]
    assert isinstance(c.to_snapshot().manifest["seed"], int)  # drawn from the generator


def test_snapshot_keeps_the_seed_and_reads_old_manifests():
    X, _ = _blobs(200)
    clf = _small(random_state=7).fit(X, batch_size=50)
    snap = clf.to_snapshot()
    back = OnlineClusterer.from_snapshot(snap, device="cpu")
    assert back.random_state == 7
    np.testing.assert_array_equal(back.predict(X), clf.predict(X))
    old = {k: v for k, v in snap.manifest.items() if k != "seed"}  # a manifest without a seed
    again = OnlineClusterer.from_snapshot(Snapshot.create(snap.weights, old), device="cpu")
    np.testing.assert_array_equal(again.predict(X), clf.predict(X))


def test_numpy_scalar_parameters_as_a_grid_search_sets_them():
    X, _ = _blobs(120)
    params = {"n_clusters": np.int64(3), "latent_dim": np.int64(8), "sigma": np.float32(5.0),
              "random_state": np.int32(2), "prior": "online"}
    clf = _small(**params).fit(X, batch_size=60)
    manifest = json.loads(clf.to_snapshot().manifest_json())  # JSON-able, plain numbers
    assert (manifest["n_clusters"], manifest["latent_dim"], manifest["seed"]) == (3, 8, 2)
    back = OnlineClusterer.from_snapshot(Snapshot.from_parts(clf.to_snapshot().weights,
                                                             json.dumps(manifest)))
    np.testing.assert_array_equal(back.predict(X), clf.predict(X))


def test_clone_pickle_and_pipeline():
    X, y = _blobs()
    clf = _small(random_state=0, sigma=5.0).fit(X, batch_size=64)
    fresh = clone(clf)
    assert fresh.get_params() == clf.get_params() and not fresh.is_fitted
    back = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(back.predict(X), clf.predict(X))
    pipe = make_pipeline(StandardScaler(), _small(random_state=0))
    labels = pipe.fit_predict(X, onlineclusterer__epochs=3)
    alone = _small(random_state=0).fit(StandardScaler().fit_transform(X), epochs=3)
    np.testing.assert_array_equal(labels, alone.labels_)
    assert adjusted_rand_score(y, labels) > 0.5
    assert pipe.transform(X).shape == (300, 8) and pipe.predict(X[:5]).shape == (5,)
    pandas = make_pipeline(StandardScaler(), _small(random_state=0)).set_output(transform="pandas")
    out = pandas.fit(X).transform(X)  # the clusterer sees DataFrames in fit and transform
    assert list(out.columns[:2]) == ["onlineclusterer0", "onlineclusterer1"]
    np.testing.assert_array_equal(pandas[-1].feature_names_in_, ["x0", "x1", "x2", "x3", "x4"])


def test_transform_dtype_follows_the_input():
    X, _ = _blobs(64)
    clf = _small(random_state=0).fit(X)
    assert clf.transform(X).dtype == np.float64
    assert clf.transform(X.astype(np.float32)).dtype == np.float32
    assert clf.transform(X.astype(np.int64)).dtype == np.float64
    np.testing.assert_array_equal(clf.transform(X), clf.transform(X.astype(np.float32)))
    assert clf.predict(X).dtype == np.int64 and clf.soft_assign(X).dtype == np.float64


def test_declared_subset_variance_is_float32_rounding_only():
    X = 3 * np.random.RandomState(0).uniform(size=(20, 3))
    clf = _small(n_clusters=1, random_state=1).fit(X)
    one_by_one = np.concatenate([clf.transform(x[None]) for x in X])
    np.testing.assert_allclose(one_by_one, clf.transform(X), atol=2e-6)
    np.testing.assert_array_equal(np.concatenate([clf.predict(x[None]) for x in X]), clf.predict(X))
