"""Message formats: decode and validate sample and reading messages, encode them for producers.

Two payload encodings, chosen per message by the ``content-type`` header (or forced for a
whole topic with ``encoding="json"``/``"f32"``):

* **JSON** (default, no header or ``content-type: application/json``)
  - sample: ``{"features": [...], "id": "...", "label": 3, "ts": 1700000000.0}``; only
    ``features`` is required; it may be nested (e.g. ``[[...], ...]`` for a C×T window).
  - reading: ``{"device": "...", "ts": 12.5, "values": [c1, ..., cC], "label": 0}``; ``device``
    falls back to the Kafka key; ``ts`` orders readings (arrival order when absent).
* **binary float32** (``content-type: application/x-oclust-f32``): the value is the sample's
  (or reading's) numbers as little-endian IEEE-754 float32 in C order, nothing else. Optional
  headers carry the rest as ASCII text: ``label`` (integer), ``id``, ``ts`` (float) and, for
  readings, ``device``. Shape comes from the model (or the first valid message), so a binary
  sample must have exactly ``prod(shape) * 4`` bytes.
* **multi-sample float32** (``content-type: application/x-oclust-f32`` plus a ``rows: n``
  header): the value is an n x shape matrix of little-endian float32 in C order (``n *
  prod(shape) * 4`` bytes), decoded zero-copy into n samples. Optional headers: ``shape``
  (the per-sample shape, comma-separated, e.g. ``3,100``; default the model's, or flat) and
  ``labels`` (n comma-separated integers, -1 for none). A wrong size or shape is
  ``wrong_length``, a bad ``rows``/``shape``/``labels`` header ``bad_schema``.

A message that fails is rejected with :class:`DecodeError`, whose ``reason`` is one short code
(used as the DLQ ``reason`` header and as a metric label) and whose message says what is wrong:
``empty``, ``too_large``, ``not_json``, ``bad_schema``, ``not_numbers``, ``non_finite``,
``wrong_length``, ``bad_binary``, ``too_deep`` (nesting beyond :data:`MAX_DEPTH`),
``out_of_range`` (a feature beyond ``max_abs``, default :data:`DEFAULT_MAX_ABS_FEATURE`, or a
label above :data:`MAX_LABEL`) and ``decode_failed`` (anything else the decoder tripped on: the
decoders never raise anything but :class:`DecodeError` for a message).

Example:
    >>> dec = SampleDecoder()
    >>> batch = dec.decode_batch([b'{"features": [1, 2], "label": 1}', b'{"features": [3]}'])
    >>> batch.features.tolist(), batch.labels.tolist(), [(i, e.reason) for i, e in batch.rejects]
    ([[1.0, 2.0]], [1], [(1, 'wrong_length')])
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from training_worker.settings import MAX_ABS_FEATURE

__all__ = [
    "CONTENT_TYPE_F32",
    "CONTENT_TYPE_JSON",
    "DEFAULT_MAX_ABS_FEATURE",
    "ENCODINGS",
    "MAX_DEPTH",
    "MAX_LABEL",
    "REASONS",
    "DecodeError",
    "DecodedBatch",
    "Reading",
    "ReadingDecoder",
    "SampleDecoder",
    "decode_matrix",
    "encode_matrix",
    "encode_reading",
    "encode_sample",
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


def _header(headers: Headers | None, name: str) -> bytes | None:
    if headers:
        for key, value in headers:
            if key == name:
                return value
    return None


def _is_f32(headers: Headers | None, encoding: str) -> bool:
    if encoding == "f32":
        return True
    if encoding == "json":
        return False
    ctype = _header(headers, "content-type")
    return ctype is not None and ctype.split(b";")[0].strip() == CONTENT_TYPE_F32.encode()


def _check_size(value: bytes | None, max_bytes: int) -> bytes:
    if not value:
        raise DecodeError("empty", "message has no value")
    if len(value) > max_bytes:
        raise DecodeError("too_large", f"{len(value)} bytes exceeds the limit of {max_bytes}")
    return value


def _parse_json(value: bytes) -> dict[str, Any]:
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


def _numbers(raw: Any, field_name: str) -> np.ndarray:
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


def _bounded(arr: np.ndarray, field_name: str, max_abs: float) -> np.ndarray:
    """Reject finite magnitudes beyond ``max_abs`` (call after :func:`_finite`)."""
    if arr.size and float(np.abs(arr).max()) > max_abs:
        raise DecodeError("out_of_range", f"{field_name!r} has a value beyond ±{max_abs:g}")
    with np.errstate(over="ignore"):  # a bound beyond float32's range gives inf
        return _finite(arr.astype(np.float32), field_name)


def _guarded(fn: Any) -> Any:
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


def _finite(arr: np.ndarray, field_name: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise DecodeError("non_finite", f"{field_name!r} contains NaN or infinite values")
    return arr


def _label(raw: Any) -> int:
    if raw is None:
        return -1
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise DecodeError("bad_schema", f"'label' must be a non-negative integer, got {raw!r}")
    if raw > MAX_LABEL:
        raise DecodeError("out_of_range", f"'label' {raw} exceeds {MAX_LABEL}")
    return raw


def _header_label(headers: Headers | None) -> int:
    raw = _header(headers, "label")
    if raw is None:
        return -1
    if len(raw) > 20:
        raise DecodeError("out_of_range", f"'label' header too long: {raw[:24]!r}...")
    try:
        value = int(raw)
    except ValueError:
        raise DecodeError("bad_schema", f"'label' header must be an integer, got {raw!r}") from None
    return _label(value)


def _f32(value: bytes, shape: tuple[int, ...] | None) -> np.ndarray:
    if len(value) % 4:
        raise DecodeError("bad_binary", f"{len(value)} bytes is not a whole number of float32")
    arr = np.frombuffer(value, dtype="<f4")
    if shape is not None:
        if arr.size != math.prod(shape):
            raise DecodeError(
                "wrong_length", f"{arr.size} float32 values, expected {math.prod(shape)} {shape}"
            )
        arr = arr.reshape(shape)
    return _finite(arr.astype(np.float32), "value")


_F32 = CONTENT_TYPE_F32.encode()


def _scan_headers(
    headers: Sequence[Headers | None], encoding: str
) -> tuple[bool, list[int]] | None:
    """One pass over a batch's headers: (all float32?, header labels), or ``None`` when the
    batch mixes encodings or has a label header the strict path must judge."""
    kinds: set[bool] = set()
    labels: list[int] = []
    for h in headers:
        f32, label = encoding == "f32", -1
        for key, value in h or ():
            if key == "content-type" and encoding == "auto":
                f32 = value == _F32 or value.split(b";")[0].strip() == _F32
            elif key == "label":
                if not value.isdigit() or len(value) > 10 or int(value) > MAX_LABEL:
                    return None
                label = int(value)
        kinds.add(f32)
        labels.append(label)
    if len(kinds) != 1:
        return None
    return kinds.pop(), labels


def _header_ints(headers: Headers | None, name: str) -> np.ndarray | None:
    """A header of comma-separated integers as int64, ``None`` when absent."""
    raw = _header(headers, name)
    if raw is None:
        return None
    try:
        return np.array(raw.split(b","), dtype=np.bytes_).astype(np.int64)
    except (ValueError, OverflowError):
        raise DecodeError(
            "bad_schema", f"{name!r} header must be comma-separated integers, got {raw[:40]!r}"
        ) from None


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
        >>> decode_matrix(value, headers, (4,))
        Traceback (most recent call last):
        ...
        training_worker.codec.DecodeError: wrong_length: samples of shape (2,), expected (4,)
    """
    value = _check_size(value, max_bytes)
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


@dataclass
class DecodedBatch:
    """What :meth:`SampleDecoder.decode_batch` returns.

    ``features`` (n_ok, *shape) float32, ``labels`` (n_ok,) int64 with -1 where absent,
    ``index`` (n_ok,) the input position of every sample's message (repeated for the rows of a
    multi-sample message), ``rejects`` (position, error).
    """

    features: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    rejects: list[tuple[int, DecodeError]] = field(default_factory=list)


class SampleDecoder:
    """Decode and validate sample messages into float32 arrays of one shape.

    The shape is ``shape`` when given (e.g. the model's input shape), else it is fixed by the
    first valid message. A batch of well-formed JSON (or binary) messages decodes in one
    vectorised pass; a batch with any bad message falls back to a strict per-message pass.

    Args:
        shape: expected per-sample shape, or ``None`` to learn it from the stream.
        max_bytes: larger messages are rejected as ``too_large``.
        encoding: ``"auto"`` (by header), ``"json"`` or ``"f32"`` for the whole topic.
        max_abs: larger magnitudes are rejected as ``out_of_range``.

    Example:
        >>> try:
        ...     SampleDecoder(shape=(2,)).decode(b'{"features": [1, NaN]}')
        ... except DecodeError as exc:
        ...     print(exc.reason)
        non_finite
    """

    def __init__(
        self,
        shape: tuple[int, ...] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        encoding: str = "auto",
        max_abs: float = DEFAULT_MAX_ABS_FEATURE,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.shape = tuple(shape) if shape is not None else None
        self.max_bytes = max_bytes
        self.encoding = encoding
        self.max_abs = max_abs

    @_guarded
    def decode(self, value: bytes | None, headers: Headers | None = None) -> tuple[np.ndarray, int]:
        """One message → (features of ``shape``, label or -1); raises :class:`DecodeError`."""
        value = _check_size(value, self.max_bytes)
        if _is_f32(headers, self.encoding):
            arr, label = _f32(value, self.shape), _header_label(headers)
        else:
            obj = _parse_json(value)
            if "features" not in obj:
                raise DecodeError("bad_schema", "missing required field 'features'")
            arr = _finite(_numbers(obj["features"], "features"), "features")
            label = _label(obj.get("label"))
        arr = _bounded(arr, "features", self.max_abs)
        if self.shape is None:
            self.shape = arr.shape
        elif arr.shape != self.shape:
            raise DecodeError(
                "wrong_length", f"features of shape {arr.shape}, expected {self.shape}"
            )
        return arr, label

    def decode_batch(
        self, values: Sequence[bytes | None], headers: Sequence[Headers | None] | None = None
    ) -> DecodedBatch:
        """Decode many messages; good ones stacked in input order, bad ones in ``rejects``."""
        headers = headers if headers is not None else [None] * len(values)
        if any(_has_rows(h) for h in headers):
            return self._decode_multi(values, headers)
        try:
            fast = self._fast(values, headers)
        except Exception:  # hostile bytes: the strict path judges each message
            fast = None
        if fast is not None:
            return fast
        feats, labels, index, rejects = [], [], [], []
        for i, (v, h) in enumerate(zip(values, headers, strict=True)):
            try:
                arr, label = self.decode(v, h)
            except DecodeError as exc:
                rejects.append((i, exc))
                continue
            feats.append(arr)
            labels.append(label)
            index.append(i)
        shape = self.shape or (0,)
        return DecodedBatch(
            np.stack(feats) if feats else np.empty((0, *shape), np.float32),
            np.asarray(labels, dtype=np.int64),
            np.asarray(index, dtype=np.int64),
            rejects,
        )

    def _decode_multi(
        self, values: Sequence[bytes | None], headers: Sequence[Headers | None]
    ) -> DecodedBatch:
        """A batch holding multi-sample messages: one vectorised decode per message."""
        feats, labels, index, rejects = [], [], [], []
        for i, (v, h) in enumerate(zip(values, headers, strict=True)):
            try:
                if _has_rows(h):
                    if not _is_f32(h, self.encoding):
                        raise DecodeError("bad_schema", "a 'rows' header needs float32 content")
                    arr, lab = decode_matrix(v, h, self.shape, self.max_bytes, self.max_abs)
                    self.shape = self.shape or arr.shape[1:]
                else:
                    one, label = self.decode(v, h)
                    arr, lab = one[None], np.array([label], np.int64)
            except DecodeError as exc:
                rejects.append((i, exc))
                continue
            feats.append(arr)
            labels.append(lab)
            index.append(np.full(len(arr), i, np.int64))
        if not feats:
            return DecodedBatch(np.empty((0, *(self.shape or (0,))), np.float32),
                                np.empty(0, np.int64), np.empty(0, np.int64), rejects)
        return DecodedBatch(np.concatenate(feats), np.concatenate(labels),
                            np.concatenate(index), rejects)

    def _fast(self, values: Sequence[bytes | None], headers: Sequence[Headers | None]) -> (
        DecodedBatch | None
    ):
        """Vectorised decode of an all-good batch of one encoding; ``None`` to fall back."""
        if not values or any(not v or len(v) > self.max_bytes for v in values):
            return None
        scanned = _scan_headers(headers, self.encoding)
        if scanned is None:
            return None
        f32, labels = scanned
        if f32:
            return self._fast_f32(values, labels)
        return self._fast_json(values)

    def _fast_f32(self, values: Sequence[bytes], labels: list[int]) -> DecodedBatch | None:
        if self.shape is None:
            return None  # the first message fixes the shape: take the strict path
        blob = b"".join(values)
        size = math.prod(self.shape)
        if len(blob) != 4 * size * len(values) or any(len(v) != 4 * size for v in values):
            return None
        arr = np.frombuffer(blob, dtype="<f4").reshape(len(values), *self.shape)
        if not np.isfinite(arr).all() or (arr.size and np.abs(arr).max() > self.max_abs):
            return None
        return DecodedBatch(arr.astype(np.float32), np.array(labels, np.int64),
                            np.arange(len(values)))

    def _fast_json(self, values: Sequence[bytes]) -> DecodedBatch | None:
        try:
            objs = [orjson.loads(v) for v in values]  # strict: NaN literals go the slow way
            raw = [o["features"] for o in objs]
            raw_labels = [o.get("label") for o in objs]
        except (ValueError, UnicodeDecodeError, TypeError, KeyError, AttributeError):
            return None
        try:
            arr = np.array(raw)  # dtype inferred: strings, None, ragged lists do not pass
        except (ValueError, OverflowError):
            return None
        if arr.dtype.kind not in "fi" or not 2 <= arr.ndim <= MAX_DEPTH + 1 or (
            arr.shape[0] != len(values)
        ):
            return None  # bool-only lists give kind "b"; mixed bools are caught below
        if self.shape is not None and arr.shape[1:] != self.shape:
            return None
        if any(b"true" in v or b"false" in v for v in values):
            return None  # a boolean could hide among numbers: let the strict path judge
        with np.errstate(over="ignore"):
            arr32 = arr.astype(np.float32)
        if not np.isfinite(arr32).all() or (arr32.size and np.abs(arr32).max() > self.max_abs):
            return None
        if any(lab is not None and (type(lab) is not int or not 0 <= lab <= MAX_LABEL)
               for lab in raw_labels):
            return None
        labels = np.array([-1 if lab is None else lab for lab in raw_labels], dtype=np.int64)
        if self.shape is None:
            self.shape = arr32.shape[1:]
        return DecodedBatch(arr32, labels, np.arange(len(values)))


@dataclass(frozen=True)
class Reading:
    """One sensor reading: ``values`` (C,) float32 from ``device`` at time ``ts``."""

    device: str
    ts: float | None
    values: np.ndarray
    label: int = -1


class ReadingDecoder:
    """Decode and validate reading messages ``{"device", "ts", "values"}`` (or binary).

    Args:
        channels: expected C, or ``None`` to learn it from the first valid reading.
        max_bytes: larger messages are rejected as ``too_large``.
        encoding: ``"auto"`` (by header), ``"json"`` or ``"f32"``.
        max_abs: larger magnitudes are rejected as ``out_of_range``.

    Example:
        >>> r = ReadingDecoder().decode(b'{"device": "a", "ts": 1.5, "values": [1, 2, 3]}')
        >>> r.device, r.ts, r.values.tolist()
        ('a', 1.5, [1.0, 2.0, 3.0])
    """

    def __init__(
        self,
        channels: int | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        encoding: str = "auto",
        max_abs: float = DEFAULT_MAX_ABS_FEATURE,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.channels = channels
        self.max_bytes = max_bytes
        self.encoding = encoding
        self.max_abs = max_abs

    @_guarded
    def decode(
        self, value: bytes | None, headers: Headers | None = None, key: bytes | None = None
    ) -> Reading:
        """One message → :class:`Reading`; raises :class:`DecodeError`."""
        value = _check_size(value, self.max_bytes)
        if _is_f32(headers, self.encoding):
            values = _f32(value, None)
            device_raw: Any = _header(headers, "device")
            ts_raw: Any = _header(headers, "ts")
            label = _header_label(headers)
            device = device_raw.decode(errors="replace") if device_raw is not None else None
            try:
                ts = float(ts_raw) if ts_raw is not None else None
            except ValueError:
                raise DecodeError(
                    "bad_schema", f"'ts' header is not a number: {ts_raw!r}"
                ) from None
        else:
            obj = _parse_json(value)
            if "values" not in obj:
                raise DecodeError("bad_schema", "missing required field 'values'")
            values = _finite(_numbers(obj["values"], "values"), "values")
            if values.ndim != 1:
                raise DecodeError("bad_schema", "'values' must be a flat list, one per channel")
            device = obj.get("device")
            if device is not None and not isinstance(device, str | int):
                raise DecodeError("bad_schema", "'device' must be a string")
            device = None if device is None else str(device)
            ts = obj.get("ts")
            if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float)):
                raise DecodeError("bad_schema", f"'ts' must be a number, got {ts!r}")
            if ts is not None and not math.isfinite(ts):
                raise DecodeError("non_finite", "'ts' is not finite")
            label = _label(obj.get("label"))
        values = _bounded(values, "values", self.max_abs)
        if device is None:
            if not key:
                raise DecodeError("bad_schema", "reading has no 'device' and no message key")
            device = key.decode(errors="replace")
        if self.channels is None:
            self.channels = int(values.shape[0])
        elif values.shape[0] != self.channels:
            raise DecodeError(
                "wrong_length", f"{values.shape[0]} values, expected {self.channels} channels"
            )
        return Reading(device, None if ts is None else float(ts), values, label)


def encode_sample(
    features: np.ndarray | Sequence[float],
    label: int | None = None,
    id: str | None = None,
    ts: float | None = None,
    binary: bool = False,
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Message value and headers for one sample (JSON by default, float32 when ``binary``).

    Example:
        >>> encode_sample([1.0, 2.0], label=3)
        (b'{"features": [1.0, 2.0], "label": 3}', [])
    """
    arr = np.asarray(features, dtype=np.float32)
    if binary:
        headers = [("content-type", CONTENT_TYPE_F32.encode())]
        headers += [(k, str(v).encode()) for k, v in (("label", label), ("id", id), ("ts", ts))
                    if v is not None]
        return arr.astype("<f4").tobytes(), headers
    obj: dict[str, Any] = {"features": arr.tolist()}
    obj |= {k: v for k, v in (("label", label), ("id", id), ("ts", ts)) if v is not None}
    return json.dumps(obj).encode(), []


def encode_reading(
    device: str,
    values: np.ndarray | Sequence[float],
    ts: float | None = None,
    label: int | None = None,
    binary: bool = False,
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Message value and headers for one reading.

    Example:
        >>> encode_reading("s1", [0.5, 1.0], ts=2.0)
        (b'{"device": "s1", "values": [0.5, 1.0], "ts": 2.0}', [])
    """
    arr = np.asarray(values, dtype=np.float32)
    if binary:
        headers = [("content-type", CONTENT_TYPE_F32.encode()), ("device", device.encode())]
        headers += [(k, str(v).encode()) for k, v in (("ts", ts), ("label", label))
                    if v is not None]
        return arr.astype("<f4").tobytes(), headers
    obj: dict[str, Any] = {"device": device, "values": arr.tolist()}
    obj |= {k: v for k, v in (("ts", ts), ("label", label)) if v is not None}
    return json.dumps(obj).encode(), []
