"""Multi-sample float32 messages: an n x shape matrix in one value, with a ``rows`` header.

Example:
    >>> value, headers = encode_matrix(np.ones((2, 3)), labels=[0, 1])
    >>> x, labels = decode_matrix(value, headers, None)
    >>> x.shape, labels.tolist()
    ((2, 3), [0, 1])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from oclust.training_worker.codec import base
from oclust.training_worker.codec.base import (
    CONTENT_TYPE_F32,
    DEFAULT_MAX_ABS_FEATURE,
    DEFAULT_MAX_BYTES,
    MAX_LABEL,
    DecodeError,
    Headers,
)

__all__ = ["decode_matrix", "encode_matrix"]


def _header_ints(headers: Headers | None, name: str) -> np.ndarray | None:
    """A header of comma-separated integers as int64, ``None`` when absent."""
    raw = base.header(headers, name)
    if raw is None:
        return None
    try:
        return np.array(raw.split(b","), dtype=np.bytes_).astype(np.int64)
    except (ValueError, OverflowError):
        raise DecodeError(
            "bad_schema", f"{name!r} header must be comma-separated integers, got {raw[:40]!r}"
        ) from None


@base.guarded
def decode_matrix(
    value: bytes | None, headers: Headers | None, shape: tuple[int, ...] | None,
    max_bytes: int = DEFAULT_MAX_BYTES, max_abs: float = DEFAULT_MAX_ABS_FEATURE,
) -> tuple[np.ndarray, np.ndarray]:
    """A multi-sample float32 message (``rows`` header) → ((n, *shape) float32, (n,) labels).

    The same bounds as a single sample: finite features within ``±max_abs`` and labels in
    ``-1..MAX_LABEL`` (else ``non_finite`` / ``out_of_range``).

    The matrix is a read-only view of ``value`` (np.frombuffer, no copy); the per-sample shape is
    ``shape`` (the model's) and must agree with a ``shape`` header when both are given.

    Example:
        >>> value, headers = encode_matrix(np.arange(6, dtype=np.float32).reshape(3, 2))
        >>> x, labels = decode_matrix(value, headers, (2,))
        >>> x.tolist(), labels.tolist()
        ([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], [-1, -1, -1])
        >>> try:
        ...     decode_matrix(value, headers, (4,))
        ... except DecodeError as exc:
        ...     print(exc)
        wrong_length: samples of shape (2,), expected (4,)
    """
    value = base.check_size(value, max_bytes)
    rows = _header_ints(headers, "rows")
    if rows is None or rows.shape != (1,) or rows[0] < 1:
        raise DecodeError("bad_schema", "'rows' header must be one integer >= 1")
    n = int(rows[0])
    stated = _header_ints(headers, "shape")
    if stated is not None:
        if (stated < 1).any():
            raise DecodeError("bad_schema", f"'shape' header must be positive, got {stated}")
        if shape is not None and tuple(stated.tolist()) != tuple(shape):
            raise DecodeError(
                "wrong_length", f"samples of shape {tuple(stated.tolist())}, expected {shape}"
            )
        shape = tuple(int(v) for v in stated)
    if len(value) % 4:
        raise DecodeError("bad_binary", f"{len(value)} bytes is not a whole number of float32")
    size = len(value) // 4
    if shape is None:
        shape = (size // n,)  # flat samples, the default when nothing says otherwise
    if size != n * math.prod(shape):
        raise DecodeError(
            "wrong_length", f"{size} float32 values are not {n} rows of {tuple(shape)}"
        )
    arr = np.frombuffer(value, dtype="<f4").reshape(n, *shape)
    if not np.isfinite(arr).all():
        raise DecodeError("non_finite", "the matrix contains NaN or infinite values")
    if arr.size and np.abs(arr).max() > max_abs:
        raise DecodeError("out_of_range", f"a feature's magnitude exceeds {max_abs:g}")
    labels = _header_ints(headers, "labels")
    if labels is None:
        labels = np.full(n, -1, dtype=np.int64)
    elif labels.shape != (n,) or (labels < -1).any():
        raise DecodeError("bad_schema", f"'labels' header must hold {n} integers >= -1")
    elif (labels > MAX_LABEL).any():
        raise DecodeError("out_of_range", f"a label exceeds {MAX_LABEL}")
    return arr, labels


def encode_matrix(
    features: np.ndarray, labels: Sequence[int] | np.ndarray | None = None
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Message value and headers for n samples at once (``features`` of shape (n, *shape)).

    Example:
        >>> value, headers = encode_matrix(np.zeros((2, 3)), labels=[1, 0])
        >>> len(value), headers  # doctest: +NORMALIZE_WHITESPACE
        (24, [('content-type', b'application/x-oclust-f32'), ('rows', b'2'), ('shape', b'3'),
              ('labels', b'1,0')])
    """
    arr = np.ascontiguousarray(features, dtype="<f4")
    if arr.ndim < 2 or not arr.shape[0]:
        raise ValueError(f"features must be (n >= 1, *shape), got shape {arr.shape}")
    headers = [("content-type", CONTENT_TYPE_F32.encode()), ("rows", str(arr.shape[0]).encode()),
               ("shape", ",".join(map(str, arr.shape[1:])).encode())]
    if labels is not None:
        headers.append(("labels", ",".join(str(int(v)) for v in labels).encode()))
    return arr.tobytes(), headers


def _has_rows(headers: Headers | None) -> bool:
    return any(key == "rows" for key, _ in headers or ())
