"""Sample messages (one sample each, JSON or float32, or multi-sample matrices) → batches.

Example:
    >>> value, headers = encode_sample([1.0, 2.0], label=3, binary=True)
    >>> SampleDecoder(shape=(2,)).decode(value, headers)[0].tolist()
    [1.0, 2.0]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from oclust.training_worker.codec import base
from oclust.training_worker.codec.base import (
    CONTENT_TYPE_F32,
    DEFAULT_MAX_ABS_FEATURE,
    DEFAULT_MAX_BYTES,
    MAX_DEPTH,
    MAX_LABEL,
    DecodeError,
    Headers,
)
from oclust.training_worker.codec.matrix import _has_rows, decode_matrix

__all__ = ["DecodedBatch", "SampleDecoder", "encode_sample"]

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


class SampleDecoder(base.Decoder):
    """Decode and validate sample messages into float32 arrays of one shape.

    The shape is ``shape`` when given (e.g. the model's input shape), else it is fixed by the
    first batch: the shape most of its valid messages have (the first message's on a tie), so
    one malformed message ahead of the stream does not send every good one to the DLQ. A batch
    of well-formed JSON (or binary) messages decodes in one vectorised pass; a batch with any
    bad message falls back to a strict per-message pass.

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
        super().__init__(max_bytes, encoding, max_abs)
        self.shape = tuple(shape) if shape is not None else None

    @base.guarded
    def decode(self, value: bytes | None, headers: Headers | None = None) -> tuple[np.ndarray, int]:
        """One message → (features of ``shape``, label or -1); raises :class:`DecodeError`."""
        value = base.check_size(value, self.max_bytes)
        if base.is_f32(headers, self.encoding):
            arr, label = base.f32(value, self.shape), base.header_label(headers)
        else:
            obj = base.parse_json(value)
            if "features" not in obj:
                raise DecodeError("bad_schema", "missing required field 'features'")
            arr = base.finite(base.numbers(obj["features"], "features"), "features")
            label = base.label(obj.get("label"))
        arr = base.bounded(arr, "features", self.max_abs)
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
        if self.shape is None and len(values) > 1:
            self.settle_shape(values, headers)
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

    def settle_shape(
        self, values: Sequence[bytes | None], headers: Sequence[Headers | None]
    ) -> None:
        """Learn the shape from a first batch: the one most of its valid messages have (the
        first's on a tie), so one malformed message ahead of the stream does not decide it."""
        if self.shape is None:
            self.shape = self._common_shape(values, headers)

    def _common_shape(
        self, values: Sequence[bytes | None], headers: Sequence[Headers | None]
    ) -> tuple[int, ...] | None:
        """The per-sample shape most of the valid messages have (the first's on a tie)."""
        shapes: Counter[tuple[int, ...]] = Counter()
        for v, h in zip(values, headers, strict=True):
            try:
                if _has_rows(h):
                    rows = decode_matrix(v, h, None, self.max_bytes, self.max_abs)[0]
                    shapes[rows.shape[1:]] += 1
                else:  # a fresh decoder: each message judged on its own
                    probe = SampleDecoder(None, self.max_bytes, self.encoding, self.max_abs)
                    shapes[probe.decode(v, h)[0].shape] += 1
            except DecodeError:
                continue
        return shapes.most_common(1)[0][0] if shapes else None

    def _decode_multi(
        self, values: Sequence[bytes | None], headers: Sequence[Headers | None]
    ) -> DecodedBatch:
        """A batch holding multi-sample messages: one vectorised decode per message."""
        feats, labels, index, rejects = [], [], [], []
        for i, (v, h) in enumerate(zip(values, headers, strict=True)):
            try:
                if _has_rows(h):
                    if not base.is_f32(h, self.encoding):
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
    return base.encode(features, "features", binary, {}, {"label": label, "id": id, "ts": ts})
