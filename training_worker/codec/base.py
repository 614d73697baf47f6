"""What every message decoder shares: the error type and its reasons, limits, and the checks.

Each check raises :class:`DecodeError` with one reason code from :data:`REASONS`; the message
formats themselves are described in :mod:`oclust.training_worker.codec`. The formats call the
checks through the module (``base.numbers(...)``); the package re-exports only ``__all__``.

Example:
    >>> label(3), label(None)
    (3, -1)
    >>> try:
    ...     numbers([1, "x"], "features")
    ... except DecodeError as exc:
    ...     print(exc.reason)
    not_numbers
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from oclust.training_worker.settings import MAX_ABS_FEATURE

__all__ = [
    "CONTENT_TYPE_F32",
    "CONTENT_TYPE_JSON",
    "DEFAULT_MAX_ABS_FEATURE",
    "DEFAULT_MAX_BYTES",
    "ENCODINGS",
    "MAX_DEPTH",
    "MAX_LABEL",
    "REASONS",
    "DecodeError",
    "Headers",
]

CONTENT_TYPE_F32 = "application/x-oclust-f32"
CONTENT_TYPE_JSON = "application/json"
ENCODINGS = ("auto", "json", "f32")
REASONS = (
    "empty", "too_large", "not_json", "bad_schema", "not_numbers", "non_finite",
    "wrong_length", "bad_binary", "too_deep", "out_of_range", "decode_failed",
)
DEFAULT_MAX_BYTES = 1 << 20
# The one default bound on |feature| shared by the worker (DLQ ``out_of_range``) and the
# service (422): finite values far beyond any sensor's range poison the running scaler.
DEFAULT_MAX_ABS_FEATURE = MAX_ABS_FEATURE
MAX_DEPTH = 8  # nesting levels of ``features`` (a C×T window is 2)
MAX_LABEL = 2**31 - 1  # labels are class ids; larger ones are hostile or broken

Headers = Sequence[tuple[str, bytes]]


class DecodeError(ValueError):
    """A message that cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Decoder:
    """What every decoder keeps: the size limit, the payload encoding and the magnitude bound."""

    def __init__(self, max_bytes: int, encoding: str, max_abs: float) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.max_bytes = max_bytes
        self.encoding = encoding
        self.max_abs = max_abs


def encode(
    values: np.ndarray | Sequence[float],
    name: str,
    binary: bool,
    head: dict[str, str],
    tail: dict[str, Any],
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Message value and headers: ``values`` as float32 bytes (``head`` and the ``tail`` fields
    that are not ``None`` as text headers) or as the JSON field ``name`` between them."""
    arr = np.asarray(values, dtype=np.float32)
    tail = {k: v for k, v in tail.items() if v is not None}
    if binary:
        headers = [("content-type", CONTENT_TYPE_F32.encode())]
        headers += [(k, v.encode()) for k, v in head.items()]
        headers += [(k, str(v).encode()) for k, v in tail.items()]
        return arr.astype("<f4").tobytes(), headers
    return json.dumps({**head, name: arr.tolist(), **tail}).encode(), []


def header(headers: Headers | None, name: str) -> bytes | None:
    if headers:
        for key, value in headers:
            if key == name:
                return value
    return None


def is_f32(headers: Headers | None, encoding: str) -> bool:
    if encoding == "f32":
        return True
    if encoding == "json":
        return False
    ctype = header(headers, "content-type")
    return ctype is not None and ctype.split(b";")[0].strip() == CONTENT_TYPE_F32.encode()


def check_size(value: bytes | None, max_bytes: int) -> bytes:
    if not value:
        raise DecodeError("empty", "message has no value")
    if len(value) > max_bytes:
        raise DecodeError("too_large", f"{len(value)} bytes exceeds the limit of {max_bytes}")
    return value


def parse_json(value: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(value)  # iterative, depth-limited; NaN/Infinity literals are not JSON
    except orjson.JSONDecodeError:
        obj = _parse_json_lenient(value)
    if not isinstance(obj, dict):
        raise DecodeError("bad_schema", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse_json_lenient(value: bytes) -> Any:
    """Python's parser (accepts NaN literals, rejected later as non_finite); depth-guarded."""
    try:
        return json.loads(value)
    except RecursionError:
        raise DecodeError("too_deep", "JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError("not_json", f"value is not JSON: {exc}") from None


def _check_leaves(raw: list[Any], field_name: str) -> None:
    """Walk a nested list without recursion: bounded depth, numbers only, no huge ints."""
    stack: list[tuple[list[Any], int]] = [(raw, 1)]
    while stack:
        items, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise DecodeError("too_deep", f"{field_name!r} is nested deeper than {MAX_DEPTH}")
        for v in items:
            if isinstance(v, list):
                stack.append((v, depth + 1))
            elif isinstance(v, bool) or not isinstance(v, int | float):
                raise DecodeError("not_numbers", f"{field_name!r} holds values that are not "
                                  "numbers")
            elif isinstance(v, int) and not -(2**63) <= v < 2**63:
                raise DecodeError("out_of_range", f"{field_name!r} holds an integer beyond "
                                  "64 bits")


def numbers(raw: Any, field_name: str) -> np.ndarray:
    """A (possibly nested) JSON list of numbers as a float64 array, strictly checked.

    float64 first, so that a finite value beyond float32 (1e40) is ``out_of_range`` when
    bounded, not an overflow to inf."""
    if not isinstance(raw, list) or not raw:
        raise DecodeError("bad_schema", f"{field_name!r} must be a non-empty list of numbers")
    _check_leaves(raw, field_name)
    try:
        arr = np.array(raw, dtype=np.float64)
    except ValueError:
        raise DecodeError("wrong_length", f"{field_name!r} is a ragged nested list") from None
    return arr


def bounded(arr: np.ndarray, field_name: str, max_abs: float) -> np.ndarray:
    """Reject finite magnitudes beyond ``max_abs`` (call after :func:`finite`)."""
    if arr.size and float(np.abs(arr).max()) > max_abs:
        raise DecodeError("out_of_range", f"{field_name!r} has a value beyond ±{max_abs:g}")
    with np.errstate(over="ignore"):  # a bound beyond float32's range gives inf
        return finite(arr.astype(np.float32), field_name)


def guarded(fn: Any) -> Any:
    """Make a decode method raise only :class:`DecodeError`, whatever the bytes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DecodeError:
            raise
        except (RecursionError, MemoryError, OverflowError, ValueError, TypeError,
                AttributeError, KeyError, IndexError, UnicodeError) as exc:
            raise DecodeError("decode_failed", f"{type(exc).__name__}: {exc}"[:300]) from None

    return wrapper


def finite(arr: np.ndarray, field_name: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise DecodeError("non_finite", f"{field_name!r} contains NaN or infinite values")
    return arr


def label(raw: Any) -> int:
    if raw is None:
        return -1
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise DecodeError("bad_schema", f"'label' must be a non-negative integer, got {raw!r}")
    if raw > MAX_LABEL:
        raise DecodeError("out_of_range", f"'label' {raw} exceeds {MAX_LABEL}")
    return raw


def header_label(headers: Headers | None) -> int:
    raw = header(headers, "label")
    if raw is None:
        return -1
    if len(raw) > 20:
        raise DecodeError("out_of_range", f"'label' header too long: {raw[:24]!r}...")
    try:
        value = int(raw)
    except ValueError:
        raise DecodeError("bad_schema", f"'label' header must be an integer, got {raw!r}") from None
    return label(value)


def f32(value: bytes, shape: tuple[int, ...] | None) -> np.ndarray:
    if len(value) % 4:
        raise DecodeError("bad_binary", f"{len(value)} bytes is not a whole number of float32")
    arr = np.frombuffer(value, dtype="<f4")
    if shape is not None:
        if arr.size != math.prod(shape):
            raise DecodeError(
                "wrong_length", f"{arr.size} float32 values, expected {math.prod(shape)} {shape}"
            )
        arr = arr.reshape(shape)
    return finite(arr.astype(np.float32), "value")
