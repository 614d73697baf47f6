"""OnlineClusterer: bad input, determinism, snapshots, shapes of every encoder."""

import json
import warnings

import numpy as np
import pytest
import torch

from oclust.model import OnlineClusterer, Snapshot, SnapshotError, clusterer, seeding
from oclust.model.snapshot import FORMAT


def _data(n: int = 300, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _small(**kw) -> OnlineClusterer:
    return OnlineClusterer(n_clusters=3, latent_dim=8, hidden=(16,), random_state=0, **kw)


def test_nothing_is_built_in_the_constructor():
    clf = _small()
    assert not clf.is_fitted
    with pytest.raises(ValueError, match="not seen any data"):
        clf.predict(_data(2))


@pytest.mark.parametrize(
    ("prior", "match"),
    [([0.5, 0.5], "length"), ([0.5, 0.6, -0.1], "positive"), ([0.2, 0.2, 0.2], "sum to 1")],
)
def test_bad_prior_rejected_before_any_training(prior, match):
    clf = OnlineClusterer(n_clusters=3, prior=prior)  # scikit-learn: __init__ only stores
    assert clf.prior is prior
    with pytest.raises(ValueError, match=match):
        clf.validate_params()
    with pytest.raises(ValueError, match=match):
        clf.partial_fit(_data(8))
    assert not clf.is_fitted


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"regulariser": "kmeans"}, "unknown regulariser"),
        ({"sigma": 0}, "sigma"),
        ({"n_clusters": 0}, "n_clusters"),
        ({"random_state": "x"}, "random_state"),
        ({"init": "zeros"}, "init"),
        ({"latent_norm": "group"}, "latent_norm"),
        ({"sigma": "auto"}, "sigma"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"clip": 0}, "clip"),
        ({"clip": -5.0}, "clip"),
        ({"clip": float("inf")}, "clip"),
        ({"clip": "5"}, "clip"),
        ({"clip": 1e7}, "clip"),
        ({"views": "yes"}, "views"),
        ({"views": 1}, "views"),
        ({"hidden": (0,)}, "hidden"),  # an IndexError inside torch
        ({"hidden": (-3,)}, "hidden"),  # a RuntimeError
        ({"hidden": (8.5,)}, "hidden"),  # a TypeError
        ({"hidden": 8}, "hidden"),  # a TypeError
        ({"hidden": ()}, "hidden"),  # silently the default
        ({"hidden": (True,)}, "hidden"),
        ({"device": "tpu"}, "device"),  # a RuntimeError
        ({"device": 0}, "device"),  # a RuntimeError
        ({"encoder": "foo"}, "encoder"),
        ({"standardize": "no"}, "standardize"),  # accepted, and taken as True
        ({"latent_dim": True}, "latent_dim"),  # accepted as 1
        ({"latent_dim": 2, "latent_norm": "layer"}, "latent_dim must be at least 3"),
        ({"regulariser": "ent", "reg_params": {"lam": "x"}}, "lam='x'"),  # a TypeError mid-step
        ({"reg_params": {"n_iter": 5}}, "n_iter"),  # not one of ca's: refused by _build only
        ({"reg_params": {1: 5}}, "reg_params"),
    ],
)
def test_bad_parameters_rejected_by_fit(params, match):
    with pytest.raises(ValueError, match=match):
        OnlineClusterer(**params).fit(_data(8))
    with pytest.raises(ValueError, match=match):
        OnlineClusterer(**params).validate_params()


@pytest.mark.parametrize(
    ("shape", "params", "match"),
    [((8,), {"encoder": "convnet"}, "encoder 'convnet' takes images"),  # RuntimeErrors in torch
     ((3, 16), {"encoder": "lenet1d", "latent_norm": "none"}, None),
     ((8,), {"encoder": "conv1d"}, "encoder 'conv1d' takes windows"),
     ((2, 3, 4, 5), {"encoder": "lenet"}, "encoder 'lenet' takes images"),
     ((8,), {"latent_dim": 2}, "latent_dim must be at least 3 with LayerNorm"),  # collapsed
     ((3, 40), {"latent_dim": 1}, "latent_dim must be at least 3 with LayerNorm"),
     ((8,), {"latent_dim": 2, "latent_norm": "none"}, None),
     ((8, 8), {"latent_dim": 2}, None)],  # images: raw latents
)
def test_fit_refuses_an_encoder_that_cannot_take_the_data(shape, params, match):
    X = np.random.default_rng(0).normal(size=(32, *shape)).astype(np.float32)
    clf = OnlineClusterer(n_clusters=2, random_state=0, **{"hidden": (4,), **params})
    if match is None:
        assert clf.fit(X).predict(X).shape == (32,)
        return
    with pytest.raises(ValueError, match=match):
        clf.fit(X)
    assert not clf.is_fitted
    with pytest.raises(ValueError, match=match):
        clf.partial_fit(X)
    assert not clf.is_fitted


def test_the_mlp_takes_windows_flattened():
    X = np.random.default_rng(0).normal(size=(64, 3, 16)).astype(np.float32)
    clf = _small(encoder="mlp").fit(X)  # was a shape error: a first layer 3 wide, not 48
    assert clf.encoder_[0].net[0].in_features == 48
    np.testing.assert_array_equal(clf.export()(X).labels, clf.predict(X))  # the compiled kernel
    np.testing.assert_array_equal(OnlineClusterer.from_snapshot(clf.to_snapshot()).predict(X),
                                  clf.predict(X))


@pytest.mark.parametrize("bad", [{"epochs": True}, {"batch_size": True}])
def test_fit_refuses_bools_for_counts(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        _small().fit(_data(8), **bad)


def test_a_refit_refused_for_its_parameters_leaves_the_model_as_it_was():
    X = _data(64)
    clf = _small().fit(X)
    before, steps = clf.predict(X), clf.steps_
    clf.set_params(reg_params={"n_iter": 5})  # sk's, not ca's
    with pytest.raises(ValueError, match="unexpected keyword argument 'n_iter'"):
        clf.validate_params()  # it passed, and fit swapped in a fresh encoder before failing
    with pytest.raises(ValueError, match="n_iter"):
        clf.fit(X)
    assert clf.is_fitted and clf.steps_ == steps
    np.testing.assert_array_equal(clf.predict(X), before)
    in_adam = {id(p) for group in clf.optimizer_.param_groups for p in group["params"]}
    assert all(id(p) in in_adam for p in clf.encoder_.parameters())  # it trains what it serves
    clf.set_params(reg_params=None).partial_fit(X).to_snapshot()


def test_a_refit_that_fails_to_build_leaves_the_model_unfitted():
    rng = np.random.default_rng(0)
    clf = OnlineClusterer(n_clusters=3, encoder="lenet", hidden=(4, 4), random_state=0)
    clf.fit(rng.normal(size=(32, 16, 16)).astype(np.float32))
    with pytest.raises(ValueError, match="too small"):  # two 5x5 convolutions: 8x8 is too small
        clf.fit(rng.normal(size=(32, 8, 8)).astype(np.float32))
    assert not clf.is_fitted  # it was, with the new encoder config and the old encoder
    with pytest.raises(ValueError, match="not seen any data"):
        clf.to_snapshot()


@pytest.mark.parametrize(
    ("name", "value"),
    [("n_clusters", 5), ("n_clusters", 0), ("latent_dim", 6), ("hidden", (4,)),
     ("regulariser", "sk"), ("reg_params", {"bogus": 1}), ("prior", [0.5, 0.3, 0.2]),
     ("prior", "online"), ("prior_params", {"max_kl": 0.1}), ("lr", 0.5), ("betas", (0.5, 0.6)),
     ("clip", 1.0), ("standardize", False), ("device", "cpu"), ("encoder", "mlp"),
     ("latent_norm", "none"), ("hidden_norm", "none"), ("init", "normal"), ("random_state", 1),
     ("seed", 1)],
)
def test_partial_fit_refuses_parameters_set_that_the_built_model_cannot_follow(name, value):
    X = _data(64)
    clf = _small().fit(X)
    before, prior, steps = clf.predict(X), clf.prior_, clf.steps_
    clf.set_params(**{name: value})
    with pytest.raises(ValueError, match=f"^{name} changed after the model was built.*call fit"):
        clf.partial_fit(X)  # it was ignored, or broke on shapes, or divided by K = 0
    assert clf.steps_ == steps
    # inference and snapshots answer as the model was built
    np.testing.assert_array_equal(clf.predict(X), before)
    np.testing.assert_array_equal(clf.prior_, prior)  # what CA trains with, as is the manifest's
    assert clf.transform(X).shape == (64, 8) and clf.soft_assign(X).shape == (64, 3)
    manifest = clf.to_snapshot().manifest
    assert (manifest["n_clusters"], manifest["prior"]) == (3, prior.tolist())
    assert manifest["regulariser"] == "ca" and manifest["standardize"] is True
    if value != 0 and name != "reg_params":  # valid: fit builds the model they describe
        assert clf.fit(X).partial_fit(X).steps_ == 2


def test_partial_fit_follows_sigma_and_views_set_on_a_built_model():
    X = _data(64)
    clf = OnlineClusterer.from_snapshot(  # a restored online prior keeps its saved settings
        _small(prior="online", prior_params={"max_kl": 0.1}).fit(X).to_snapshot())
    clf.set_params(sigma=3.0, views=True).partial_fit(X)
    assert clf.sigma_ == 3.0 and clf.views_ and clf.steps_ == 2
    with pytest.raises(ValueError, match="sigma must be None or a positive finite number"):
        clf.set_params(sigma=-1.0).partial_fit(X)
    with pytest.raises(ValueError, match="views must be"):
        clf.set_params(sigma=None, views="yes").partial_fit(X)


def test_bad_batches_raise_clear_value_errors():
    clf = _small()
    with pytest.raises(ValueError, match="0 sample"):
        clf.partial_fit(np.zeros((0, 8)))
    with pytest.raises(ValueError, match="Reshape your data"):
        clf.partial_fit(np.zeros(8))
    with pytest.raises(ValueError, match="numeric"):
        clf.partial_fit([["a", "b"]])
    bad = _data(10)
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        clf.partial_fit(bad)
    clf.partial_fit(_data(10))
    with pytest.raises(ValueError, match="X has 7 features, but OnlineClusterer is expecting 8"):
        clf.partial_fit(np.zeros((4, 7)))
    inf = _data(3)
    inf[2, 0] = np.inf
    with pytest.raises(ValueError, match=r"infinite .*\(samples \[2\]\)"):
        clf.predict(inf)
    with pytest.raises(ValueError, match="float32"):  # finite in float64, inf in float32
        clf.predict(np.full((2, 8), 1e300))
    with pytest.raises(ValueError, match="Reshape your data"):  # one sample needs its batch axis
        clf.predict(_data(1)[0])
    windows = _small().partial_fit(np.zeros((4, 3, 20)))
    with pytest.raises(ValueError, match=r"one sample of shape \(3, 20\) without its batch"):
        windows.predict(np.zeros((3, 20)))


def test_partial_fit_returns_self_with_its_report_and_single_point_predict():
    clf = _small()
    assert clf.partial_fit(_data(64)) is clf
    rep = clf.last_step_
    assert rep.labels.shape == (64,) and rep.n == 64
    np.testing.assert_array_equal(clf.labels_, rep.served_labels)
    assert 0 <= rep.train_hard_entropy <= np.log(3) + 1e-9
    assert rep.train_kl_star >= 0 and np.isfinite(rep.loss)
    assert rep.served_labels.shape == (64,) and rep.served_labels.dtype == np.int64
    assert 0 <= rep.served_hard_entropy <= np.log(3) + 1e-9 and rep.served_kl_star >= 0
    assert clf.predict(_data(1)).shape == (1,)
    labels, dist = clf.assign(_data(5))
    assert labels.dtype == np.int64 and (dist >= 0).all()
    soft = clf.soft_assign(_data(5))
    np.testing.assert_allclose(soft.sum(1), 1.0)
    assert clf.transform(_data(5)).shape == (5, 8)
    assert clf.samples_seen_ == 64 and clf.steps_ == 1


def test_unseeded_models_start_from_different_weights():
    import torch

    X = _data(64)
    a, b = (OnlineClusterer(n_clusters=3, latent_dim=8, hidden=(16,)).partial_fit(X)
            for _ in range(2))
    first = [next(m.parameters()) for m in (a.encoder_, b.encoder_)]
    assert not torch.equal(*first)
    assert a._view_seed != b._view_seed
    state = torch.get_rng_state()  # a seeded model leaves the global stream alone
    _small().partial_fit(X)
    assert torch.equal(torch.get_rng_state(), state)


def test_deterministic_for_a_seed_on_cpu():
    X = _data()
    a = _small(device="cpu").fit(X, epochs=2, batch_size=64)
    b = _small(device="cpu").fit(X, epochs=2, batch_size=64)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    np.testing.assert_array_equal(a.transform(X), b.transform(X))


@pytest.mark.parametrize(
    ("shape", "setup"),
    [((8,), ("layer", "kmeans", 10.0)), ((3, 40), ("layer", "kmeans", 50.0)),
     ((8, 8), ("none", "centred", 50.0))],
)
def test_init_and_sigma_follow_the_encoder_unless_set(shape, setup):
    X = np.random.default_rng(1).normal(size=(64, *shape)).astype(np.float32)
    clf = _small().partial_fit(X)
    assert (clf.encoder_config_.latent_norm, clf.init_, clf.sigma_) == setup
    assert (clf.latent_norm, clf.init, clf.sigma) == ("auto", "auto", None)  # params as given
    m = clf.to_snapshot().manifest
    assert (m["encoder"]["latent_norm"], m["init"], m["sigma"]) == setup  # resolved, for serving
    back = OnlineClusterer.from_snapshot(clf.to_snapshot())
    assert (back.encoder_config_.latent_norm, back.init_, back.sigma_) == setup
    # what is set wins; a raw MLP follows its latents (centred centroids, sigma 50)
    pinned = _small(latent_norm="layer", init="kmeans++", sigma=3.0).partial_fit(X)
    assert (pinned.encoder_config_.latent_norm, pinned.init_, pinned.sigma_) == (
        "layer", "kmeans++", 3.0)
    raw = _small(latent_norm="none").partial_fit(X)
    assert (raw.init_, raw.sigma_) == ("centred", 50.0)


def test_sigma_follows_the_latents_the_encoder_and_the_regulariser():
    rng = np.random.default_rng(1)
    windows = rng.normal(size=(64, 3, 40)).astype(np.float32)
    images = rng.normal(size=(64, 8, 8)).astype(np.float32)
    assert _small(encoder="lenet1d").partial_fit(windows).sigma_ == 50.0  # any window encoder
    assert _small(regulariser="sk").partial_fit(windows).sigma_ == 10.0  # tuned with CA only
    layer = _small(latent_norm="layer").partial_fit(images)  # images with normalised latents
    assert (layer.encoder_config_.kind, layer.init_, layer.sigma_) == ("convnet", "kmeans", 10.0)


def test_inputs_seeding_takes_the_mean_latents_of_a_balanced_partition_of_the_inputs():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (48, 3)), rng.normal(8, 0.1, (16, 3))])  # 48 + 16
    z = torch.as_tensor(rng.normal(size=(64, 5)))
    labels = seeding.balanced_partition(x, np.array([0.5, 0.5]), np.random.default_rng(1))
    assert sorted(np.bincount(labels)) == [32, 32]  # the uniform prior's sizes
    small = labels[48]
    assert (labels[48:] == small).all()  # the small blob whole, topped up with the 16 points of
    toward = x[:48] @ (x[48:].mean(0) - x[:48].mean(0))  # the big one cheapest to move
    assert set(np.flatnonzero(labels[:48] == small)) == set(np.argsort(-toward)[:16])
    mu = seeding.seed_centroids(z, 2, "inputs", np.random.default_rng(1), torch.as_tensor(x))
    torch.testing.assert_close(mu, torch.stack([z[torch.as_tensor(labels == j)].mean(0)
                                                for j in range(2)]))
    by_prior = seeding.balanced_partition(x, np.array([0.75, 0.25]), np.random.default_rng(1))
    assert len(set(by_prior[:48])) == 1 and (by_prior[48:] != by_prior[0]).all()  # the blobs
    one = seeding.seed_centroids(z, 1, "inputs", rng, torch.as_tensor(x))
    torch.testing.assert_close(one, z.mean(0, keepdim=True))
    with pytest.raises(ValueError, match="pass x"):
        seeding.seed_centroids(z, 2, "inputs", rng)


def test_inputs_seeding_falls_back_to_kmeans_pp_and_bounds_its_rows(monkeypatch):
    rng = np.random.default_rng(0)
    z = torch.as_tensor(rng.normal(size=(500, 4)))
    same = torch.zeros(64, 3)  # fewer distinct inputs than K: k-means++ on the latents, as
    torch.testing.assert_close(  # "kmeans" does
        seeding.seed_centroids(z[:64], 2, "inputs", np.random.default_rng(3), same),
        seeding.kmeans_pp(z[:64], 2, np.random.default_rng(3)))
    seen = []
    real = seeding.balanced_partition
    monkeypatch.setattr(seeding, "balanced_partition",
                        lambda x, prior, g: seen.append(x) or real(x, prior, g))
    monkeypatch.setattr(seeding, "SEED_POINTS", 50)
    x = torch.as_tensor(rng.normal(size=(500, 3)))
    assert seeding.seed_centroids(z, 4, "inputs", rng, x).shape == (4, 4)
    assert len(seen[0]) == 50  # a larger batch is seeded from SEED_POINTS of its rows
    mu = seeding.seed_centroids(2 * x, 60, "inputs", rng, x)  # K > SEED_POINTS: K rows, one
    assert len(seen[1]) == 60 and mu.shape == (60, 3)  # per part, each row's own latent
    torch.testing.assert_close(mu.sort(0).values, torch.as_tensor(2 * seen[1]).sort(0).values)
    dup = torch.zeros(500, 3)
    dup[0], dup[1] = 1.0, 2.0  # 3 distinct rows in the batch, 2 in the 50 drawn with this seed
    mu = seeding.seed_centroids(z, 3, "inputs", np.random.default_rng(0), dup)
    assert len(seen) == 2 and all(bool((z == row).all(1).any()) for row in mu)  # k-means++


def test_inputs_seeding_serves_the_input_partition_sized_by_the_prior_from_the_first_step():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    truth = np.repeat([1, 0, 2], [48, 96, 48])  # the prior's large cluster is blob 0
    X = (rng.normal(size=(192, 8)) * 0.3 + 4 * np.eye(8)[truth]).astype(np.float32)
    clf = OnlineClusterer(n_clusters=3, random_state=0, init="inputs", prior=[0.5, 0.25, 0.25])
    clf.partial_fit(X)
    served = clf.last_step_.served_labels
    assert adjusted_rand_score(truth, served) == 1.0
    assert (served[truth == 0] == 0).all()  # the prior's 0.5 went to the 96-point blob
    assert clf.init_ == "inputs" and clf.to_snapshot().manifest["init"] == "inputs"
    assert OnlineClusterer.from_snapshot(clf.to_snapshot()).init_ == "inputs"


@pytest.mark.parametrize(
    ("shape", "regulariser", "views"),
    [((8,), "ca", False), ((3, 40), "ca", False), ((8, 8), "ca", True), ((8, 8), "sk", False),
     ((8, 8), "ckm", False), ((8, 8), "cm", False), ((8, 8), "drc", False)],
)
@pytest.mark.filterwarnings("ignore:views=True with regulariser")  # cm, ckm: tested below
def test_views_are_on_for_images_with_ca(shape, regulariser, views):
    X = np.random.default_rng(1).normal(size=(64, *shape)).astype(np.float32)
    clf = _small(regulariser=regulariser).partial_fit(X)
    assert clf.views == "auto" and clf.views_ is views
    snap = clf.to_snapshot()
    assert snap.manifest["views"] is views
    assert OnlineClusterer.from_snapshot(snap).views_ is views
    assert _small(regulariser=regulariser, views=not views).partial_fit(X).views_ is not views
    assert clf.set_params(views=np.bool_(not views)).views_ is not views  # as sigma_ does


@pytest.mark.parametrize("regulariser", ["cm", "ckm", "aecm"])
def test_views_on_with_a_regulariser_they_collapse_warns(regulariser):
    X = np.random.default_rng(1).normal(size=(64, 8, 8)).astype(np.float32)
    with pytest.warns(UserWarning, match=f"views=True with regulariser '{regulariser}'") as rec:
        snap = _small(regulariser=regulariser, views=True).partial_fit(X).to_snapshot()
    assert rec[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where views are off or were measured to help
        OnlineClusterer.from_snapshot(snap)  # nor at every restore (a replica's hot load)
        _small(regulariser=regulariser).partial_fit(X)
        _small(regulariser="ca", views=True).partial_fit(X)
        _small(regulariser="sk", views=True).partial_fit(X)


def test_views_train_and_a_restored_model_draws_the_views_it_would_have_drawn(monkeypatch):
    drawn = []
    real = clusterer.augment

    def recorded(x, g, kind):
        drawn.append((kind, g.initial_seed()))
        return real(x, g, kind)

    monkeypatch.setattr(clusterer, "augment", recorded)
    X = _data(256)
    clf = _small(views=True).fit(X, epochs=2, batch_size=64)
    assert [kind for kind, _ in drawn] == ["vector"] * 8  # one view per step, of the encoder's
    assert len({seed for _, seed in drawn}) == 8  # family, a fresh one each step
    plain = _small(views=False).fit(X, epochs=2, batch_size=64)
    assert len(drawn) == 8 and not np.allclose(plain.cluster_centers_, clf.cluster_centers_)
    clone = OnlineClusterer.from_snapshot(clf.to_snapshot())
    a, b = clf.partial_fit(X[:64]).last_step_, clone.partial_fit(X[:64]).last_step_
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    np.testing.assert_allclose(clone.cluster_centers_, clf.cluster_centers_, rtol=1e-5)


def test_the_view_pass_leaves_batchnorm_running_statistics_to_the_clean_batches():
    import torch
    from sklearn.datasets import load_digits

    X = load_digits().images.astype(np.float32)[:128]
    on, off = (OnlineClusterer(n_clusters=4, random_state=0, views=v).partial_fit(X)
               for v in (True, False))
    assert on.views_ and on._batchnorm
    for a, b in zip(on._batchnorm, off._batchnorm, strict=True):  # what predict normalises by
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
        assert a.num_batches_tracked == b.num_batches_tracked


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_fresh_convnet_serves_spread_labels_from_its_first_step(seed):
    """Raw latents, centred centroids and BatchNorm statistics primed on the first batch: the
    first step's served labels (what the worker's guard judges) are not one cluster."""
    from sklearn.datasets import load_digits

    X = load_digits().images.astype(np.float32)[:256]  # 8 x 8 images: the convnet
    clf = OnlineClusterer(n_clusters=10, random_state=seed).partial_fit(X)
    assert clf.encoder_config_.kind == "convnet" and clf.init_ == "centred"
    assert np.bincount(clf.labels_, minlength=10).max() / len(X) < 0.5
    assert np.bincount(clf.predict(X), minlength=10).max() / len(X) < 0.5


def test_a_restored_convnet_serves_from_its_own_statistics():
    """Priming is for fresh models: a restored one (here as if its manifest predated the step
    count, so steps_ == 0) serves its first step as predict did before it."""
    from sklearn.datasets import load_digits

    X = load_digits().images.astype(np.float32)
    clf = OnlineClusterer(n_clusters=4, random_state=0).fit(X[:512], epochs=2, batch_size=128)
    back = OnlineClusterer.from_snapshot(clf.to_snapshot())
    back.steps_ = 0
    batch = X[512:640] + 2.0  # shifted: its own statistics would serve it differently
    before = back.predict(batch)
    # the step's scaler update moves a label or two; primed statistics moved about half
    assert np.mean(back.partial_fit(batch).labels_ == before) > 0.95


def test_set_params_sigma_after_fit_takes_effect():
    X = _data(64)
    clf = _small().partial_fit(X)
    before = clf.soft_assign(X)
    clf.set_params(sigma=1000.0)
    assert clf.sigma_ == 1000.0 and clf.to_snapshot().manifest["sigma"] == 1000.0
    assert not np.allclose(clf.soft_assign(X), before)  # softer: D / (2 sigma) shrinks
    assert clf.set_params(sigma=None).sigma_ == 10.0  # back to the MLP's default


@pytest.mark.parametrize(
    ("shape", "kind"), [((8,), "mlp"), ((3, 40), "conv1d"), ((8, 8), "convnet")]
)
def test_snapshot_round_trip_gives_identical_predictions(shape, kind):
    X = np.random.default_rng(1).normal(size=(96, *shape)).astype(np.float32)
    clf = _small()
    clf.fit(X, epochs=2, batch_size=32)
    assert clf.encoder_config_.kind == kind
    snap = clf.to_snapshot(offsets={"samples:0": 96}, metrics={"loss": 1.0})
    assert snap.manifest["format"] == FORMAT and snap.manifest["input_shape"] == list(shape)
    assert snap.manifest["samples_seen"] == 192 and snap.manifest["offsets"] == {"samples:0": 96}
    json.dumps(snap.manifest)  # JSON-able
    back = OnlineClusterer.from_snapshot(Snapshot.from_parts(snap.weights, snap.manifest_json()))
    np.testing.assert_array_equal(back.predict(X), clf.predict(X))
    np.testing.assert_allclose(back.transform(X), clf.transform(X))
    # training continues identically, optimiser state included
    ra, rb = clf.partial_fit(X[:32]).last_step_, back.partial_fit(X[:32]).last_step_
    assert ra.loss == pytest.approx(rb.loss)
    np.testing.assert_allclose(back.transform(X), clf.transform(X), atol=1e-5)


def test_corrupt_snapshots_are_rejected():
    clf = _small()
    clf.partial_fit(_data(32))
    snap = clf.to_snapshot()
    with pytest.raises(SnapshotError, match="sha256"):
        OnlineClusterer.from_snapshot(Snapshot(snap.weights[:-1] + b"x", snap.manifest))
    with pytest.raises(SnapshotError, match="format"):
        OnlineClusterer.from_snapshot(Snapshot(snap.weights, {**snap.manifest, "format": "x"}))
    with pytest.raises(SnapshotError, match="JSON"):
        Snapshot.from_parts(snap.weights, b"{not json")
    junk = Snapshot.create(b"garbage", snap.manifest)
    with pytest.raises(SnapshotError, match="safetensors"):
        OnlineClusterer.from_snapshot(junk)


def test_snapshot_contains_no_pickle():
    clf = _small()
    clf.partial_fit(_data(32))
    weights = clf.to_snapshot().weights
    header_len = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + header_len])  # safetensors: JSON header, raw tensors
    assert "centroids" in header
    assert b"\x80\x04" not in weights[:2]  # not a pickle stream


def test_non_uniform_prior_keeps_imbalance():
    rng = np.random.default_rng(0)
    y = rng.choice(2, size=2000, p=[0.8, 0.2])
    X = (np.array([[0.0] * 4, [3.0] * 4])[y] + rng.normal(size=(2000, 4))).astype(np.float32)
    clf = OnlineClusterer(2, prior=[0.8, 0.2], latent_dim=8, hidden=(16,), random_state=0)
    clf.fit(X, epochs=3, batch_size=200)
    share = np.bincount(clf.predict(X), minlength=2) / len(X)
    assert share.max() > 0.65


@pytest.mark.parametrize("regulariser", ["ca", "none", "cm"])
def test_served_labels_of_a_step_are_what_predict_says(regulariser):
    """With frozen weights the step's served labels equal predict on the same batch."""
    clf = OnlineClusterer(n_clusters=3, regulariser=regulariser, latent_dim=8, lr=1e-12,
                          standardize=False, seed=0)
    clf.partial_fit(_data(64))
    x = _data(64, seed=5)
    before = clf.predict(x)  # the serving rule (for cm: its moving-average centroids)
    rep = clf.partial_fit(x).last_step_
    np.testing.assert_array_equal(rep.served_labels, before)
    hist = np.bincount(before, minlength=3) / 64
    hist = hist[hist > 0]
    assert rep.served_hard_entropy == pytest.approx(-(hist * np.log(hist)).sum())


def test_a_first_step_that_fails_leaves_the_model_unfitted_with_a_clear_error() -> None:
    huge = np.full((32, 4), 3e38, dtype=np.float32)  # finite, but the latents overflow
    clf = OnlineClusterer(n_clusters=2, standardize=False, seed=0)
    with pytest.raises(ValueError, match="latents are NaN or infinite"):
        clf.partial_fit(huge)
    assert not clf.is_fitted  # no half-built model a worker could snapshot
    clf.partial_fit(np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32))
    assert clf.is_fitted and clf.steps_ == 1 and clf.samples_seen_ == 32


def test_a_refused_batch_leaves_the_running_statistics_as_they_were() -> None:
    X = np.random.default_rng(0).normal(size=(256, 6)).astype(np.float32)
    clf = OnlineClusterer(n_clusters=4, latent_dim=8, standardize=False, seed=0)  # as "paper"
    for i in range(3):
        clf.partial_fit(X[i * 64:(i + 1) * 64])
    before = {k: v.clone() for k, v in clf.encoder_.named_buffers()}
    labels, steps = clf.predict(X), clf.steps_
    with pytest.raises(ValueError, match="distances must be finite"):
        clf.partial_fit(np.full((64, 6), 1e38, np.float32))  # finite, but it overflows
    after = dict(clf.encoder_.named_buffers())
    assert all(torch.equal(after[k], v) for k, v in before.items())  # BatchNorm's went NaN
    assert clf.steps_ == steps and (clf.predict(X) == labels).all()
    clf.partial_fit(X[192:]).to_snapshot()  # trains and snapshots on, as before the batch


def test_a_batch_that_overflows_batchnorms_statistics_is_refused() -> None:
    X = _data(64, 5)
    clf = OnlineClusterer(n_clusters=3, latent_dim=4, standardize=False, seed=0).fit(X, epochs=3)
    before = {k: v.clone() for k, v in clf.encoder_.named_buffers()}
    labels, steps = clf.predict(X), clf.steps_
    huge = np.vstack([X[:10], np.full((2, 5), 1e20, np.float32)])  # finite, latents normalised
    with pytest.raises(ValueError, match="BatchNorm's running statistics overflow"):
        clf.partial_fit(huge)  # the running variance went inf: predict served one cluster
    after = dict(clf.encoder_.named_buffers())
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert clf.steps_ == steps and (clf.predict(X) == labels).all()
    clf.partial_fit(X).to_snapshot()  # trains and snapshots on (the snapshot was refused)


def test_weights_blown_up_by_the_learning_rate_raise_floating_point_error() -> None:
    X = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    clf = OnlineClusterer(n_clusters=3, lr=1e30, seed=0)  # finite, valid, and far too large
    with pytest.raises(FloatingPointError, match="weights") as info:
        clf.partial_fit(X)
    assert not isinstance(info.value, ValueError)  # the batch is not at fault: not a refusal
    assert OnlineClusterer(n_clusters=3, lr=1e-3, seed=0).partial_fit(X).steps_ == 1


def test_a_failed_fit_leaves_no_model_and_a_blown_up_one_is_never_snapshotted() -> None:
    X = np.random.default_rng(0).normal(size=(256, 5)).astype(np.float32)
    clf = OnlineClusterer(n_clusters=3, lr=1e30, seed=0)
    with pytest.raises(FloatingPointError):
        clf.fit(X)
    assert not clf.is_fitted  # nothing a worker or a user could snapshot
    finite = OnlineClusterer(n_clusters=3, lr=1e10, seed=0).partial_fit(X[:64])
    assert all(np.isfinite(p.detach().numpy()).all() for p in finite.encoder_.parameters())
    with pytest.raises(SnapshotError, match="NaN or infinite distances on its latest"):
        finite.to_snapshot()  # finite weights, but every distance overflows
    OnlineClusterer(n_clusters=3, seed=0).partial_fit(X[:64]).to_snapshot()  # a sane one does


@pytest.mark.parametrize("param", ["sigma", "lr"])
def test_infinite_sigma_or_lr_is_refused_up_front(param: str) -> None:
    with pytest.raises(ValueError, match=f"{param} must be (None or )?a positive finite number"):
        OnlineClusterer(n_clusters=2, **{param: float("inf")}).validate_params()
    with pytest.raises(ValueError, match="alpha must be positive and finite"):
        OnlineClusterer(n_clusters=2, prior="online",
                        prior_params={"alpha": float("inf")}).validate_params()


def test_a_one_sample_batch_trains_the_batchnorm_mlp_on_its_running_statistics() -> None:
    # BatchNorm cannot take statistics from one sample (torch raises for one value per
    # feature): such a step normalises by the running ones and leaves them as they are
    X = np.random.default_rng(0).normal(size=(65, 6)).astype("float32")
    clf = OnlineClusterer(3, latent_dim=4, hidden=(8,), seed=0, device="cpu", standardize=False)
    clf.partial_fit(X[:1])  # a first batch of one
    bn = clf._batchnorm[0]
    seen: list[torch.Tensor] = []
    hook = bn.register_forward_hook(
        lambda mod, inp, out: seen.append(inp[0].detach()) if mod.training else None)
    clf.partial_fit(X[1:])
    hook.remove()
    # the first batch that has statistics sets them, as a fresh model's first batch does
    torch.testing.assert_close(bn.running_mean, seen[-1].mean(0))
    torch.testing.assert_close(bn.running_var, seen[-1].var(0))
    stats = bn.running_mean.clone(), bn.running_var.clone()
    weight = clf.encoder_[0].net[0].weight.detach().clone()
    clf.partial_fit(X[:1])
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert not torch.equal(clf.encoder_[0].net[0].weight, weight)  # but it trained
    clf.partial_fit(X[1:])
    assert not torch.equal(bn.running_mean, stats[0])  # the next batch trains as usual
    assert clf.steps_ == 4 and clf.predict(X).shape == (65,)


def test_sharing_the_mlps_first_layer_between_a_steps_two_passes_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the step runs the MLP's first Linear once for its inference and its training pass
    X = np.random.default_rng(0).normal(size=(4 * 64, 12)).astype("float32")
    runs = {}
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(clusterer, "split_stem", lambda encoder: (None, encoder))
        clf = OnlineClusterer(3, latent_dim=4, hidden=(16,), seed=0, device="cpu")
        served = [clf.partial_fit(X[i : i + 64]).last_step_.served_labels
                  for i in range(0, 256, 64)]
        assert (clusterer.split_stem(clf.encoder_)[0] is not None) == shared
        runs[shared] = served, clf.transform(X)
    for a, b in zip(runs[True][0], runs[False][0], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(runs[True][1], runs[False][1])


def test_augmented_views_leave_batchnorms_running_statistics_to_the_clean_batches() -> None:
    # inference normalises by the running statistics: the clusterer's views (images with CA)
    # and the contrastive methods' two views are normalised by their own statistics only
    X = np.random.default_rng(0).normal(size=(128, 10)).astype("float32")
    tracked = {}
    for name, views in [("ca", False), ("ca", True), ("drc", False), ("tcc", False)]:
        clf = OnlineClusterer(3, name, latent_dim=4, hidden=(8,), seed=0, views=views)
        clf.partial_fit(X[:64]).partial_fit(X[64:])
        tracked[name, views] = [int(bn.num_batches_tracked) for bn in clf._batchnorm]
    assert tracked["ca", False] == [3]  # the first step's priming pass, then one per step
    assert all(t == tracked["ca", False] for t in tracked.values()), tracked


def test_a_restored_model_continues_batchnorms_average_as_the_original_would() -> None:
    # the running statistics' plain average counts the passes that fed them, which the
    # snapshot keeps (BatchNorm's own count): one-sample steps in between do not shift it
    X = np.random.default_rng(0).normal(size=(200, 6)).astype("float32")
    clf = OnlineClusterer(3, latent_dim=4, hidden=(8,), seed=0, device="cpu")
    clf.partial_fit(X[:64]).partial_fit(X[64:65]).partial_fit(X[65:66])
    back = OnlineClusterer.from_snapshot(clf.to_snapshot(), device="cpu")
    for model in (clf, back):
        model.partial_fit(X[66:130])
    torch.testing.assert_close(back._batchnorm[0].running_mean, clf._batchnorm[0].running_mean)
    np.testing.assert_array_equal(back.transform(X), clf.transform(X))
