"""Decoding of the assign request bodies into feature arrays (JSON or raw float32).

Decoding takes a fast path first (parse the JSON once, let NumPy build the array, check dtype,
shape, finiteness and the feature bound) and only on a failure (or a ``true``/``false`` token)
walks the parsed values to say exactly what is wrong. That walk stops at the first
:data:`MAX_ERRORS` errors, so a hostile body of a million bad values costs no more than one bad
value. Either way the result is a float32 batch of the model's per-sample shape, or an
:class:`InputError` (HTTP 422) with a message. Raw float32 bodies go through
:func:`decode_binary`.

Accepted sample layouts: exactly the model's per-sample shape (a flat vector for vector models,
a C×T nested list for window models, C×H×W for image models), or a flat list of the same numbers
in row-major order.

The feature bound (``max_abs``, at most float32's largest value) is checked on the values as
sent (float64 for JSON, float32 for a raw body) before they are cast to float32, as the worker
checks them, so a value the cast would round down to the bound is refused all the same.

Example:
    >>> decode_features(b'{"features": [1, 2, 3]}', (3,)).shape
    (1, 3)
    >>> decode_items(b'{"items": [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]}', (2, 2), 10).shape
    (2, 2, 2)
    >>> decode_items(b'{"items": [[1, 2, 3, 4]]}', (2, 2), 10).shape
    (1, 2, 2)
    >>> try:
    ...     decode_features(b'{"features": [1, NaN]}', (2,))
    ... except InputError as e:
    ...     print(e)
    features[1]: NaN or infinite value (JSON allows only finite numbers)
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import orjson

from oclust.training_worker.settings import FLOAT32_MAX, MAX_ABS_FEATURE

__all__ = [
    "BodyTooLarge",
    "InputError",
    "decode_binary",
    "decode_features",
    "decode_items",
]


class InputError(ValueError):
    """A request body that cannot be assigned; the message says why (HTTP 422).

    ``errors`` lists pydantic's per-field errors (``loc``, ``msg``, ``type``) when it has them.
    """

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors



MAX_ERRORS = 5  # validation stops here: a hostile body costs the same as a slightly wrong one
EXPLAIN_BYTES = 64 * 1024  # bodies the fast parser refuses are re-read to name the value, if small
CHUNK = 256  # batch rows handed to NumPy at a time (each call holds the GIL)
_NOT_ARRAY, _NOT_NUMBER = "Input should be a valid array", "Input should be a valid number"
_NAN = "NaN or infinite value (JSON allows only finite numbers)"


def _where(loc: tuple[Any, ...]) -> str:
    return loc[0] + "".join(f"[{i}]" for i in loc[1:])


class _Problems:
    """Collects at most :data:`MAX_ERRORS` errors, then says to stop."""

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []

    def add(self, loc: tuple[Any, ...], msg: str, kind: str) -> bool:
        """Record one error; True once the cap is reached (the caller stops walking)."""
        self.errors.append({"loc": list(loc), "msg": msg, "type": kind})
        return len(self.errors) >= MAX_ERRORS

    def number(self, x: Any, loc: tuple[Any, ...], max_abs: float) -> bool:
        if isinstance(x, bool) or not isinstance(x, int | float):
            return self.add(loc, _NOT_NUMBER, "float_type")
        if isinstance(x, float) and not math.isfinite(x):
            return self.add(loc, _NAN, "finite_number")
        bound = min(max_abs, FLOAT32_MAX)
        if abs(x) > bound:
            return self.add(loc, _out_of_range_msg(x, bound), "out_of_range")
        return False

    def sample(
        self, value: Any, loc: tuple[Any, ...], max_abs: float, shape: tuple[int, ...]
    ) -> bool:
        """Walk one sample: nested lists down to the depth of ``shape`` (at least 2, so that a
        vector model's nested sample gets its shape error), or a flat list.

        A list longer than the model's flat size is one error, found before looking at its
        values; below that, every step reads a value of the body, which
        :func:`_check_size` bounded.
        """
        return self._nested(value, loc, max_abs, shape, max(len(shape), 2))

    def _nested(
        self, value: Any, loc: tuple[Any, ...], max_abs: float, shape: tuple[int, ...],
        depth: int,
    ) -> bool:
        if not isinstance(value, list):
            return self.add(loc, _NOT_ARRAY, "list_type")
        if len(value) > math.prod(shape):
            return self.add(loc, _too_long(shape, len(value)), "shape")
        if depth > 1 and value and isinstance(value[0], list):  # rows, each a list
            return any(self._nested(row, (*loc, i), max_abs, shape, depth - 1)
                       for i, row in enumerate(value))
        return any(self.number(x, (*loc, i), max_abs) for i, x in enumerate(value))

    def raise_if_any(self) -> None:
        if not self.errors:
            return
        parts = [f"{_where(tuple(e['loc']))}: {e['msg']}" for e in self.errors]
        more = f" (stopped at the first {MAX_ERRORS} errors)" if len(parts) >= MAX_ERRORS else ""
        raise InputError("; ".join(parts) + more, self.errors)


def _too_long(shape: tuple[int, ...], n: int) -> str:
    return (f"should have shape {list(shape)} (or be a flat list of {math.prod(shape)} numbers), "
            f"got {n} elements")


def _out_of_range_msg(x: float, max_abs: float) -> str:
    try:
        shown = f"{float(x):.10g}"  # 1000000.03 is not shown as the bound 1e+06 it exceeds
    except OverflowError:  # an integer beyond a float's range (JSON integers are unbounded)
        shown = f"~{'-' if x < 0 else ''}1e+{len(str(abs(int(x)))) - 1}"  # its magnitude
    return (f"out_of_range: {shown} exceeds the feature bound ±{max_abs:g} "
            "(OCLUST_MAX_ABS_FEATURE)")


def _parse(body: bytes, key: str) -> tuple[Any, bool]:
    """``(body[key], clean)``; :class:`InputError` for non-JSON, non-objects, no ``key``.

    The fast parser (orjson) reads almost every body; what it refuses (NaN, Infinity, ...) goes
    to the standard library's parser so the checks can name the value, when the body is at most
    :data:`EXPLAIN_BYTES` (the slower parser holds the GIL for its whole run; a large body gets
    the fast parser's position instead).
    ``clean`` means the body can hold nothing but lists and numbers under ``key``: no string
    other than the key, no ``true``/``false``/``null`` (NumPy would quietly turn those into
    numbers). Only a clean value goes straight to NumPy; anything else is checked element-wise
    first, which also keeps NumPy from building a huge string array out of a hostile body.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as fast:
        if len(body) > EXPLAIN_BYTES:
            raise InputError(f"body: Invalid JSON ({fast}; NaN and Infinity are not JSON "
                             "numbers)") from None
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise InputError(f"body: Invalid JSON ({str(exc)[:200]})") from None
    if not isinstance(obj, dict):
        raise InputError("body: Input should be an object", [
            {"loc": [], "msg": "Input should be an object", "type": "model_type"}])
    if key not in obj:
        raise InputError(f"{key}: required field is missing", [
            {"loc": [key], "msg": "Field required", "type": "missing"}])
    return obj[key], body.count(b'"') == 2 and not any(w in body for w in _NON_NUMBERS)


_NON_NUMBERS = (b"true", b"false", b"null")


def _as_array(raw: Any) -> np.ndarray | None:
    """float64 array of ``raw``, known to hold only lists and numbers; ``None`` if ragged.

    Long lists go to NumPy :data:`CHUNK` rows at a time, so that no single call holds the GIL
    long enough to delay the event loop's other requests.
    """
    try:
        if isinstance(raw, list) and len(raw) > CHUNK:
            parts = [np.asarray(raw[i:i + CHUNK], dtype=np.float64)
                     for i in range(0, len(raw), CHUNK)]
            return np.concatenate(parts) if parts[0].ndim else None
        return np.asarray(raw, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        return None


def _finite32(arr: np.ndarray, what: str, max_abs: float, nan_msg: str = _NAN) -> np.ndarray:
    """float32 copy of ``arr``; :class:`InputError` naming the first non-finite or too-large value.

    Too large means beyond ``max_abs`` (error type ``out_of_range``) or beyond float32, judged
    on ``arr`` as sent, before the cast (which could round a value down to the bound).
    """
    bound = min(max_abs, FLOAT32_MAX)
    if arr.size == 0:
        return arr.astype(np.float32)
    # min/max propagate NaN: two values tell whether every one is finite and within the bound
    low, high = float(arr.min()), float(arr.max())
    if math.isfinite(low) and math.isfinite(high) and -bound <= low and high <= bound:
        return arr.astype(np.float32)
    bad = np.argwhere(~np.isfinite(arr) | (np.abs(arr) > bound))[0]
    loc = (what, *(int(i) for i in bad))
    value = arr[tuple(bad)]
    if not np.isfinite(value):
        raise InputError(f"{_where(loc)}: {nan_msg}",
                         [{"loc": list(loc), "msg": nan_msg, "type": "finite_number"}])
    msg = _out_of_range_msg(float(value), bound)
    error = {"loc": list(loc), "msg": msg, "type": "out_of_range"}
    raise InputError(f"{_where(loc)}: {msg}", [error])


def _fit_shape(arr: np.ndarray, shape: tuple[int, ...], batched: bool, what: str) -> np.ndarray:
    """Reshape to (N, *shape), accepting flat samples of the right size."""
    sample = arr.shape[1:] if batched else arr.shape
    if sample == shape:
        return arr if batched else arr[None]
    size = math.prod(shape)
    if len(sample) == 1 and sample[0] == size:
        return arr.reshape((-1, *shape))
    noun = "each item must" if batched else "must"
    raise InputError(
        f"{what}: {noun} have shape {list(shape)} (or be a flat list of {size} numbers), "
        f"got shape {list(sample)}"
    )


class BodyTooLarge(InputError):
    """A body larger than any valid request for this model could be (HTTP 413)."""


def _check_size(body: bytes, values: int, what: str) -> None:
    """:class:`BodyTooLarge` when ``body`` is far larger than ``values`` JSON numbers need.

    Generous (128 bytes per number plus 4 KiB, and as many commas), and cheap: it reads the
    bytes once in C, so a multi-megabyte hostile body is refused before it is parsed.
    """
    if len(body) > 4096 + 128 * values or body.count(b",") > values + 64:
        raise BodyTooLarge(
            f"{what}: the body ({len(body)} bytes) holds more than {values} numbers' worth; "
            "split it or send fewer values"
        )


def decode_features(
    body: bytes, shape: tuple[int, ...], max_abs: float = MAX_ABS_FEATURE
) -> np.ndarray:
    """The ``features`` of an :class:`~oclust.service.schemas.AssignRequest` body as a float32 batch
    (1, *shape)."""
    _check_size(body, math.prod(shape), "features")
    raw, clean = _parse(body, "features")
    arr = _as_array(raw) if clean else None
    if arr is None or arr.ndim == 0:
        problems = _Problems()
        problems.sample(raw, ("features",), max_abs, shape)
        problems.raise_if_any()
        arr = _as_array(raw)  # only lists and numbers now
        if arr is None:
            raise InputError("features: rows of a C×T sample must all have the same length")
    if arr.size == 0:
        raise InputError("features: empty; send the sample's numbers")
    return _fit_shape(_finite32(arr, "features", max_abs), shape, batched=False, what="features")


def _item_shape(item: list[Any], index: int) -> list[int]:
    try:
        return list(np.asarray(item, dtype=np.float64).shape)
    except ValueError:
        raise InputError(
            f"items[{index}]: rows of a C×T sample must all have the same length"
        ) from None


def _too_many(n: int, max_batch: int) -> InputError:
    return InputError(
        f"items: {n} items exceed the batch limit of {max_batch} (split the batch)"
    )


def decode_items(
    body: bytes, shape: tuple[int, ...], max_batch: int, max_abs: float = MAX_ABS_FEATURE
) -> np.ndarray:
    """The ``items`` of an :class:`~oclust.service.schemas.AssignBatchRequest` body as a float32
    batch (N, *shape)."""
    _check_size(body, max_batch * math.prod(shape), f"items (at most {max_batch} samples)")
    raw, clean = _parse(body, "items")
    if not isinstance(raw, list):
        raise InputError(f"items: {_NOT_ARRAY}", [
            {"loc": ["items"], "msg": _NOT_ARRAY, "type": "list_type"}])
    if len(raw) > max_batch:
        raise _too_many(len(raw), max_batch)
    if not raw:
        raise InputError("items: empty; send at least one sample")
    arr = _as_array(raw) if clean else None
    if arr is None or arr.ndim < 2:
        problems = _Problems()
        for i, item in enumerate(raw):
            if problems.sample(item, ("items", i), max_abs, shape):
                break
        problems.raise_if_any()
        arr = _as_array(raw)  # only lists and numbers now
        if arr is None or arr.ndim < 2:
            first = _item_shape(raw[0], 0)
            for i, item in enumerate(raw[1:], start=1):
                if (s := _item_shape(item, i)) != first:
                    raise InputError(
                        f"items: all items must have the same shape; items[0] has shape "
                        f"{first}, items[{i}] has {s}"
                    )
            raise InputError("items: each item must be a non-empty list of numbers")
    if arr.size == 0:
        raise InputError("items: empty items; send at least one sample with numbers")
    return _fit_shape(_finite32(arr, "items", max_abs), shape, batched=True, what="items")


def decode_binary(
    body: bytes, shape: tuple[int, ...], max_batch: int, max_abs: float = MAX_ABS_FEATURE,
    single: bool = False,
) -> np.ndarray:
    """A raw little-endian float32 body (rows back to back) as a float32 batch (N, *shape).

    The number of rows is the body length divided by the bytes of one sample (4 · prod(shape));
    ``single``: the body must hold exactly one (``POST /assign``).

    Example:
        >>> decode_binary(np.arange(6, dtype="<f4").tobytes(), (3,), 10).tolist()
        [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """
    row = 4 * math.prod(shape)
    if not body:
        raise InputError("body: empty; send at least one sample of float32 values")
    if len(body) % row:
        raise InputError(
            f"body: {len(body)} bytes is not a whole number of samples (one sample is "
            f"{math.prod(shape)} little-endian float32 values = {row} bytes, shape {list(shape)})"
        )
    if single and len(body) > row:
        raise InputError(f"body: {len(body) // row} samples, but /assign takes one sample; "
                         "send several to /assign/batch")
    if len(body) // row > max_batch:
        raise _too_many(len(body) // row, max_batch)
    arr = np.frombuffer(body, dtype="<f4").reshape((-1, *shape))
    return _finite32(arr, "sample", max_abs, "NaN or infinite float32 value")
