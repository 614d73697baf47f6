"""Bundled datasets load offline with the documented shapes."""

import numpy as np
import pytest

from model import datasets


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [("digits", (1797, 64), 10), ("segments", (2310, 18), 7), ("basic_motions", (80, 6, 100), 4)],
)
def test_sample_datasets(name, shape, classes):
    X, y = datasets.load(name)
    assert X.shape == shape and X.dtype == np.float32
    assert y.shape == (shape[0],) and int(y.max()) + 1 == classes
    assert np.isfinite(X).all()


def test_daphnet_reading_stream():
    readings, labels = datasets.load_daphnet()
    assert readings.shape == (7040, 9) and labels.shape == (7040,)
    assert set(np.unique(labels)) <= {0, 1}


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.load("mnist")


def test_standardize_per_channel():
    X = np.random.default_rng(0).normal(3, 2, size=(50, 4, 30)).astype(np.float32)
    Z = datasets.standardize(X)
    np.testing.assert_allclose(Z.mean(axis=(0, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(Z.std(axis=(0, 2)), 1, atol=1e-4)
