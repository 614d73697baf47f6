"""Offline training to a snapshot (``oclust train``): a warm start for a stream, or a model to
serve without Kafka.

Inputs: a bundled dataset by name, a ``.npy`` file (float array, N×D or N×C×T; never pickled
objects) or a ``.csv`` file (numbers only; a non-numeric first row is taken as a header).
A reading stream (T×C, e.g. ``daphnet``) can be cut into C×T windows with ``window_size``.

Example:
    >>> import tempfile
    >>> from oclust.training_worker.store import open_store
    >>> X, y = load_input(dataset="digits")
    >>> clf = train_offline(X[:256], n_clusters=10, epochs=1, latent_dim=16, seed=0)
    >>> store = open_store("file://" + tempfile.mkdtemp(), "demo")
    >>> publish_model(store, clf, evaluate(clf, X[:256], y[:256]))
    1
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from oclust.model import OnlineClusterer, StepReport, datasets
from oclust.model import metrics as model_metrics
from oclust.training_worker.monitor import MIN_PER_CLUSTER, RESERVOIR_ROWS, InputReservoir
from oclust.training_worker.settings import MAX_ABS_FEATURE
from oclust.training_worker.store import SnapshotStore

__all__ = ["evaluate", "load_input", "make_windows", "publish_model", "train_offline"]


def _read_csv(path: Path) -> np.ndarray:
    with path.open(newline="") as fh:
        rows = [r for r in csv.reader(fh) if r]
    if not rows:
        raise ValueError(f"{path} is empty")
    try:
        [float(v) for v in rows[0]]
    except ValueError:
        rows = rows[1:]  # header
    try:
        X = np.array([[float(v) for v in r] for r in rows], dtype=np.float32)
    except ValueError as exc:
        raise ValueError(f"{path} must hold numbers only (after an optional header): {exc}") \
            from None
    if X.ndim != 2:
        raise ValueError(f"{path}: rows have different lengths")
    return X


def load_input(
    dataset: str | None = None, input_path: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples (float32) and labels (or ``None``) from a dataset name or a file."""
    if (dataset is None) == (input_path is None):
        raise ValueError("give exactly one of a dataset name or an input file")
    if dataset is not None:
        if dataset.lower() == "daphnet":
            readings, labels = datasets.load_daphnet()
            return readings, labels
        return datasets.load(dataset)
    path = Path(str(input_path))
    if not path.is_file():
        raise ValueError(f"input file {path} does not exist")
    if path.suffix == ".npy":
        try:
            X = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{path} is not a plain numeric .npy array: {exc}") from None
        if X.dtype.kind not in "fiu":
            raise ValueError(f"{path} holds {X.dtype}, expected numbers")
        X = X.astype(np.float32)
    elif path.suffix == ".csv":
        X = _read_csv(path)
    else:
        raise ValueError(f"input must be a .npy or .csv file, got {path.name}")
    if X.ndim < 2 or X.size == 0:  # no samples, or samples of no features
        raise ValueError(f"{path}: expected N samples × features, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{path} contains NaN or infinite values")
    if np.abs(X).max() > MAX_ABS_FEATURE:  # as the worker and the service refuse them
        raise ValueError(f"{path} holds values beyond ±{MAX_ABS_FEATURE:g}, the feature bound "
                         "of the worker and the service (scale them first)")
    return X, None


def make_windows(
    readings: np.ndarray, labels: np.ndarray | None, size: int, hop: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sliding C×T windows of a T×C reading stream (majority label per window)."""
    hop = hop or size
    if readings.ndim != 2 or len(readings) < size:
        raise ValueError(f"need a (T, C) reading stream with T >= {size}, got {readings.shape}")
    W = np.ascontiguousarray(sliding_window_view(readings, size, axis=0)[::hop])
    if labels is None:
        return W.astype(np.float32), None
    lw = sliding_window_view(labels, size)[::hop]
    maj = np.array([np.bincount(r).argmax() for r in lw], dtype=np.int64)
    return W.astype(np.float32), maj


def train_offline(
    X: np.ndarray,
    n_clusters: int,
    epochs: int = 10,
    batch_size: int = 256,
    regulariser: str = "ca",
    seed: int | None = 0,
    on_step: Callable[[StepReport], None] | None = None,
    **params: object,
) -> OnlineClusterer:
    """Train a fresh clusterer for ``epochs`` shuffled passes over ``X``."""
    clf = OnlineClusterer(n_clusters=n_clusters, regulariser=regulariser, seed=seed,
                          **params)  # type: ignore[arg-type]
    return clf.fit(X, epochs=epochs, batch_size=batch_size, callback=on_step)


def evaluate(clf: OnlineClusterer, X: np.ndarray, y: np.ndarray | None) -> dict[str, float]:
    """Hard entropy and KL* of the predictions on ``X``; ACC/NMI/ARI when labels exist."""
    pred = clf.predict(X)
    hist = model_metrics.cluster_distribution(pred, clf.n_clusters)
    out = {
        "hard_entropy": model_metrics.entropy(hist),
        "hard_entropy_ratio": model_metrics.entropy(hist) / math.log(max(clf.n_clusters, 2)),
        "kl_star": model_metrics.kl_star(hist, clf.prior_),
    }
    if y is not None:
        out |= {
            "acc": float(model_metrics.cluster_acc(y, pred)),
            "nmi": float(model_metrics.nmi(y, pred)),
            "ari": float(model_metrics.ari(y, pred)),
        }
    return out


def publish_model(store: SnapshotStore, clf: OnlineClusterer, metrics: dict[str, float],
                  inputs: np.ndarray | None = None) -> int:
    """Publish ``clf`` (no Kafka offsets) and return its version. With ``inputs`` (what it
    trained on), a random sample of them is stored with it, as a worker stores its own: a worker
    resuming from the snapshot judges its snapshots on them (a burst on the stream is then not
    all it judges on)."""
    snap = clf.to_snapshot(offsets={}, metrics=metrics)
    if inputs is not None:
        rows = max(RESERVOIR_ROWS, MIN_PER_CLUSTER * clf.n_clusters)  # as a worker keeps
        sample = InputReservoir(rows=rows)
        sample.add(np.asarray(inputs)[np.random.default_rng(0).permutation(len(inputs))[:rows]])
        snap = sample.store_in(snap, min_rows=MIN_PER_CLUSTER * clf.n_clusters)
    return store.publish(snap)
