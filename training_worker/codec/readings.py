"""Reading messages: one multi-channel sensor reading each, from a device at a time.

Example:
    >>> value, headers = encode_reading("s1", [0.5, 1.0], ts=2.0, binary=True)
    >>> r = ReadingDecoder(channels=2).decode(value, headers)
    >>> r.device, r.ts, r.values.tolist()
    ('s1', 2.0, [0.5, 1.0])
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oclust.training_worker.codec import base
from oclust.training_worker.codec.base import (
    DEFAULT_MAX_ABS_FEATURE,
    DEFAULT_MAX_BYTES,
    DecodeError,
    Headers,
)

__all__ = ["Reading", "ReadingDecoder", "encode_reading"]


@dataclass(frozen=True)
class Reading:
    """One sensor reading: ``values`` (C,) float32 from ``device`` at time ``ts``."""

    device: str
    ts: float | None
    values: np.ndarray
    label: int = -1


class ReadingDecoder(base.Decoder):
    """Decode and validate reading messages ``{"device", "ts", "values"}`` (or binary).

    Args:
        channels: expected C, or ``None`` to learn it: from the first batch with
            :meth:`settle_channels` (the count most of its valid readings have), else from the
            first valid reading.
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
        super().__init__(max_bytes, encoding, max_abs)
        self.channels = channels

    def settle_channels(
        self, values: Sequence[bytes | None], headers: Sequence[Headers | None],
        keys: Sequence[bytes | None],
    ) -> None:
        """Learn C from a first batch: the count most of its valid readings have (the first's
        on a tie), so one malformed reading ahead of the stream does not decide it."""
        if self.channels is not None:
            return
        counts: Counter[int] = Counter()
        for v, h, k in zip(values, headers, keys, strict=True):
            try:
                counts[ReadingDecoder(None, self.max_bytes, self.encoding, self.max_abs)
                       .decode(v, h, k).values.shape[0]] += 1
            except DecodeError:
                continue
        if counts:
            self.channels = counts.most_common(1)[0][0]

    @base.guarded
    def decode(
        self, value: bytes | None, headers: Headers | None = None, key: bytes | None = None
    ) -> Reading:
        """One message → :class:`Reading`; raises :class:`DecodeError`."""
        value = base.check_size(value, self.max_bytes)
        if base.is_f32(headers, self.encoding):
            values = base.f32(value, None)
            device_raw: Any = base.header(headers, "device")
            ts_raw: Any = base.header(headers, "ts")
            label = base.header_label(headers)
            device = device_raw.decode(errors="replace") if device_raw is not None else None
            try:
                ts = float(ts_raw) if ts_raw is not None else None
            except ValueError:
                raise DecodeError(
                    "bad_schema", f"'ts' header is not a number: {ts_raw!r}"
                ) from None
        else:
            obj = base.parse_json(value)
            if "values" not in obj:
                raise DecodeError("bad_schema", "missing required field 'values'")
            values = base.finite(base.numbers(obj["values"], "values"), "values")
            if values.ndim != 1:
                raise DecodeError("bad_schema", "'values' must be a flat list, one per channel")
            device = obj.get("device")
            if device is not None and not isinstance(device, str | int):
                raise DecodeError("bad_schema", "'device' must be a string")
            device = None if device is None else str(device)
            ts = obj.get("ts")
            if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float)):
                raise DecodeError("bad_schema", f"'ts' must be a number, got {ts!r}")
            if isinstance(ts, int) and abs(ts) > 2**63:  # JSON integers are unbounded
                raise DecodeError("out_of_range", "'ts' is an integer beyond 64 bits")
            label = base.label(obj.get("label"))
        if ts is not None and not math.isfinite(ts):  # JSON's NaN or a header's "inf"
            raise DecodeError("non_finite", "'ts' is not finite")
        values = base.bounded(values, "values", self.max_abs)
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
    return base.encode(values, "values", binary, {"device": device}, {"ts": ts, "label": label})
