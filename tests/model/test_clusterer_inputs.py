"""OnlineClusterer takes any array-like and answers as on a contiguous float32 copy, in bounded
memory: strided and reversed views, Fortran order, lists, DataFrames, float64/float16/int input."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oclust.model.clusterer as clusterer
from oclust.model import OnlineClusterer

D = 5
DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.int16, np.uint8]
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _small(**kw) -> OnlineClusterer:
    params = {"n_clusters": 3, "latent_dim": 8, "hidden": (16,), "random_state": 0}
    return OnlineClusterer(**{**params, "device": "cpu", **kw})


@pytest.fixture(scope="module")
def fitted() -> OnlineClusterer:
    X = np.random.default_rng(0).normal(scale=20, size=(200, D))
    return _small().fit(X, epochs=2, batch_size=50)


@st.composite
def strided(draw: st.DrawFn, shape: tuple[int, ...] = (D,)) -> np.ndarray:
    """An (n, *shape) array of a random dtype laid out as a strided, maybe reversed view."""
    n = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(DTYPES))
    lo, hi = (0, 255) if dtype == np.uint8 else (-100, 100)
    flat = draw(st.lists(st.integers(lo, hi), min_size=n * int(np.prod(shape)),
                         max_size=n * int(np.prod(shape))))
    values = np.asarray(flat).reshape(n, *shape) / draw(st.sampled_from([1, 4]))
    steps = [draw(st.sampled_from([1, 2, 3, -1, -2])) for _ in range(1 + len(shape))]
    order = draw(st.sampled_from("CF"))
    buf = np.zeros([s * abs(k) for s, k in zip((n, *shape), steps, strict=True)], dtype, order)
    view = buf[tuple(slice(None, None, k) for k in steps)]
    view[...] = values.astype(dtype)
    return view


def _same_answers(clf: OnlineClusterer, X, ref: np.ndarray, twin=None) -> None:
    """Every inference method on X agrees exactly with ``twin`` (default: clf itself) on the
    contiguous float32 ``ref``."""
    twin = clf if twin is None else twin
    z_ref, z = twin.transform(ref), clf.transform(X)
    assert z_ref.dtype == np.float32
    np.testing.assert_array_equal(z.astype(np.float32), z_ref)
    np.testing.assert_array_equal(clf.predict(X), twin.predict(ref))
    np.testing.assert_array_equal(clf.soft_assign(X), twin.soft_assign(ref))
    for got, want in zip(clf.assign(X), twin.assign(ref), strict=True):
        np.testing.assert_array_equal(got, want)


@SETTINGS
@given(X=strided())
def test_inference_on_any_layout_and_dtype_equals_the_float32_copy(fitted, X):
    ref = np.ascontiguousarray(X, dtype=np.float32)
    _same_answers(fitted, X, ref)
    _same_answers(fitted, X.tolist(), ref)
    assert fitted.transform(X).dtype == (np.float32 if X.dtype == np.float32 else np.float64)


@SETTINGS
@given(X=strided())
def test_partial_fit_on_any_layout_and_dtype_equals_the_float32_copy(X):
    a, b = _small().partial_fit(X), _small().partial_fit(np.ascontiguousarray(X, np.float32))
    assert a.last_step_.loss == b.last_step_.loss
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)


@settings(max_examples=15, deadline=None)
@given(X=strided(shape=(3, 12)))
def test_windows_with_reversed_channels_and_time(X):
    ref = np.ascontiguousarray(X, dtype=np.float32)
    a, b = _small().partial_fit(X), _small().partial_fit(ref)
    assert a.encoder_config_.kind == "conv1d"
    assert a.last_step_.loss == b.last_step_.loss
    _same_answers(a, X, ref)
    _same_answers(a, X[::-1], np.ascontiguousarray(ref[::-1]))


def test_read_only_input_is_used_but_never_written():
    X = np.random.default_rng(1).normal(size=(64, D)).astype(np.float32)
    X.setflags(write=False)
    clf = _small().partial_fit(X)
    _same_answers(clf, X, X.copy())
    assert not X.flags.writeable


def test_dataframes_with_reordered_and_mixed_columns():
    rng = np.random.default_rng(2)
    df = pd.DataFrame(rng.normal(size=(80, D)), columns=list("abcde"))
    df["c"] = rng.integers(-5, 5, size=80)  # an int column: a mixed-dtype frame
    reordered = df[list("edcba")]
    ref = np.ascontiguousarray(reordered.to_numpy(), dtype=np.float32)
    a, b = _small().partial_fit(reordered), _small().partial_fit(ref)
    assert a.last_step_.loss == b.last_step_.loss
    np.testing.assert_array_equal(a.feature_names_in_, list("edcba"))
    _same_answers(a, reordered, ref, twin=b)
    _same_answers(a, reordered.iloc[::-1], np.ascontiguousarray(ref[::-1]), twin=b)
    # columns named as in fit but in another order are refused, not silently misread
    with pytest.raises(ValueError, match="Feature names must be in the same order"):
        a.predict(df)


def test_a_restored_model_checks_the_columns_it_was_fitted_on():
    df = pd.DataFrame(np.random.default_rng(2).normal(size=(80, D)), columns=list("abcde"))
    clf = _small().fit(df)
    back = OnlineClusterer.from_snapshot(clf.to_snapshot())  # it had neither
    assert back.n_features_in_ == D
    np.testing.assert_array_equal(back.feature_names_in_, list("abcde"))
    np.testing.assert_array_equal(back.get_feature_names_out(), clf.get_feature_names_out())
    with pytest.raises(ValueError, match="Feature names must be in the same order"):
        back.predict(df[list("edcba")])  # was accepted, and misread
    np.testing.assert_array_equal(back.predict(df), clf.predict(df))
    plain = OnlineClusterer.from_snapshot(_small().fit(df.to_numpy()).to_snapshot())
    assert plain.n_features_in_ == D and not hasattr(plain, "feature_names_in_")
    with pytest.raises(ValueError, match="X has 4 features"):
        plain.predict(df.to_numpy()[:, :4].tolist())


def test_clear_errors_for_flattened_images_and_non_numeric_columns():
    images = np.random.default_rng(3).random((64, 8, 8)).astype(np.float32)
    clf = OnlineClusterer(3, latent_dim=4, hidden=(4,), seed=0).partial_fit(images)
    for bad in (images.reshape(64, 64), images[:, None], pd.DataFrame(images.reshape(64, 64))):
        with pytest.raises(ValueError, match=r"expected samples of shape \(8, 8\)"):
            clf.predict(bad)
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": pd.to_datetime(["2020-01-01", "2020-01-02"])})
    vec = _small().partial_fit(np.zeros((8, 2), np.float32) + np.arange(8)[:, None])
    with pytest.raises(ValueError, match="numbers only"):
        vec.predict(frame)


def _peak_growth_mib(fn, *args) -> tuple[float, np.ndarray]:
    """Peak RSS above the current RSS while ``fn(*args)`` runs, in MiB (Linux: the kernel's
    high-water mark, reset through /proc/self/clear_refs; it counts torch's allocations)."""

    def status(key: str) -> float:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) / 1024

    Path("/proc/self/clear_refs").write_text("5")
    base = status("VmRSS")
    out = fn(*args)
    return status("VmHWM") - base, out


@pytest.mark.parametrize(
    ("make_x", "params", "methods"),
    [
        # 150k float64 rows of 256 features: a float32 copy of the input alone is 146 MiB
        (lambda: np.random.default_rng(0).random((150_000, 256)), {"hidden": (16,)},
         ("predict", "transform")),
        # 6000 images through the full-resolution CNN: 8 maps of 28x28 per image, 144 MiB
        (lambda: np.random.default_rng(0).integers(0, 256, (6000, 28, 28), dtype=np.uint8),
         {"hidden": (8,), "encoder": "cnn"}, ("predict",)),
    ],
    ids=["features-float64", "images-uint8"],
)
def test_inference_memory_does_not_grow_with_n(make_x, params, methods):
    X = make_x()
    clf = _small(**params).partial_fit(X[:256])
    clf.predict(X[: 2 * clf._chunk_rows()])  # warm the allocator up on two chunks
    bound = 4 * clusterer.INFERENCE_BYTES / 2**20  # a chunk's input, activations and copies
    for name in methods:
        growth, out = _peak_growth_mib(getattr(clf, name), X)
        assert len(out) == len(X)
        assert growth <= bound + out.nbytes / 2**20, (name, growth)
