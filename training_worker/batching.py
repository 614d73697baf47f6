"""The queue between decoding and training: decoded samples wait here to be cut into batches.

Every queued sample remembers where it came from, so the worker can tell, per partition, the
smallest Kafka offset that has not been trained yet (:meth:`SampleQueue.pending`): committed
offsets never pass a sample that is still waiting.

Example:
    >>> import numpy as np
    >>> q = SampleQueue()
    >>> q.put(np.zeros((3, 2), np.float32), np.array([0, 1, -1]), partition=0, offsets=[5, 6, 7])
    >>> batch = q.take(2)
    >>> batch.x.shape, batch.labels.tolist(), len(q), q.pending()
    ((2, 2), [0, 1], 1, {0: 7})
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Batch", "SampleQueue"]


@dataclass(frozen=True)
class Batch:
    """Samples to train on: ``x`` (N, *shape) float32 and ``labels`` (N,) int64 (-1: none)."""

    x: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class _Chunk:
    x: np.ndarray
    labels: np.ndarray
    pins: list[dict[int, int]] | None  # per sample: partition -> min offset (windows)
    partition: int  # samples: one partition per chunk ...
    offsets: np.ndarray | None  # ... and one offset per sample
    held: list[tuple[tuple[int, int], ...]] | None = None  # windows: every (partition, offset)

    def __len__(self) -> int:
        return len(self.x)

    def split(self, n: int) -> tuple[_Chunk, _Chunk]:
        def cut(part: slice) -> _Chunk:
            return _Chunk(
                self.x[part], self.labels[part], self.pins[part] if self.pins is not None else None,
                self.partition, self.offsets[part] if self.offsets is not None else None,
                self.held[part] if self.held is not None else None,
            )

        return cut(slice(None, n)), cut(slice(n, None))

    def pending(self) -> dict[int, int]:
        if self.offsets is not None:
            return {self.partition: int(self.offsets.min())} if len(self.offsets) else {}
        out: dict[int, int] = {}
        for pin in self.pins or ():
            for p, o in pin.items():
                out[p] = min(o, out.get(p, o))
        return out

    def without(self, partitions: set[int]) -> _Chunk | None:
        if self.offsets is not None:
            return None if self.partition in partitions else self
        keep = [i for i, pin in enumerate(self.pins or ()) if not set(pin) & partitions]
        if not keep:
            return None
        return _Chunk(self.x[keep], self.labels[keep], [self.pins[i] for i in keep],  # type: ignore[index]
                      -1, None, [self.held[i] for i in keep] if self.held is not None else None)


class SampleQueue:
    """FIFO of decoded samples; ``take(n)`` cuts the next batch.

    ``first_at`` is the monotonic time the oldest waiting sample arrived (for the batch time
    limit), ``None`` when empty.
    """

    def __init__(self) -> None:
        self._chunks: deque[_Chunk] = deque()
        self._size = 0
        self.first_at: float | None = None
        self._split: dict[int, tuple[int, int]] = {}  # partition -> (offset, rows taken)

    def __len__(self) -> int:
        return self._size

    def _add(self, chunk: _Chunk) -> None:
        if not len(chunk):
            return
        if self._size == 0:
            self.first_at = time.monotonic()
        self._chunks.append(chunk)
        self._size += len(chunk)

    def put(
        self,
        x: np.ndarray,
        labels: np.ndarray,
        partition: int,
        offsets: Sequence[int] | np.ndarray,
    ) -> None:
        """Queue samples that came from ``offsets`` of one ``partition``."""
        self._add(_Chunk(x, np.asarray(labels, np.int64), None, partition,
                         np.asarray(offsets, np.int64)))

    def put_pinned(
        self,
        x: np.ndarray,
        labels: np.ndarray,
        pins: list[dict[int, int]],
        held: list[tuple[tuple[int, int], ...]] | None = None,
    ) -> None:
        """Queue samples (windows) each pinned to offsets of possibly several partitions;
        ``held``: per sample, the (partition, offset) of every message it was made of."""
        self._add(_Chunk(x, np.asarray(labels, np.int64), list(pins), -1, None,
                         list(held) if held is not None else None))

    def held(self) -> list[tuple[int, int]]:
        """(partition, offset) of every message a waiting window was made of."""
        return [src for c in self._chunks for window in c.held or () for src in window]

    def take(self, n: int) -> Batch:
        """Remove and return up to ``n`` samples, oldest first."""
        parts: list[_Chunk] = []
        need = n
        while need > 0 and self._chunks:
            chunk = self._chunks.popleft()
            if len(chunk) > need:
                chunk, rest = chunk.split(need)
                self._chunks.appendleft(rest)
                self._note_split(chunk, rest)
            parts.append(chunk)
            need -= len(chunk)
        self._size -= n - need
        self.first_at = None if self._size == 0 else self.first_at
        if not parts:
            raise ValueError("take() from an empty queue")
        if len(parts) == 1:
            return Batch(parts[0].x, parts[0].labels)
        return Batch(np.concatenate([c.x for c in parts]),
                     np.concatenate([c.labels for c in parts]))

    def _note_split(self, head: _Chunk, rest: _Chunk) -> None:
        """Count the rows taken of a multi-sample message that ``head`` and ``rest`` share."""
        if head.offsets is None or rest.offsets is None or rest.offsets[0] != head.offsets[-1]:
            return
        offset = int(head.offsets[-1])
        rows = len(head) - int(np.searchsorted(head.offsets, offset))
        before = self._split.get(head.partition)
        if before is not None and before[0] == offset:  # split again: a third batch
            rows += before[1]
        self._split[head.partition] = (offset, rows)

    def taken_before(self, partition: int, offset: int, rows: int) -> None:
        """The first ``rows`` of the message at ``offset`` were taken before these (by the
        model a snapshot resumed), so :meth:`split_rows` counts them too."""
        self._split[partition] = (offset, rows)

    def split_rows(self) -> dict[int, tuple[int, int]]:
        """Per partition whose oldest waiting message lost its first rows to earlier batches:
        ``(its offset, rows already taken)``. A snapshot covers those rows though its offset
        stops at the message."""
        waiting = self.pending()
        return {p: s for p, s in self._split.items() if waiting.get(p) == s[0]}

    def pending(self) -> dict[int, int]:
        """Per partition, the smallest offset among the waiting samples."""
        out: dict[int, int] = {}
        for chunk in self._chunks:
            for p, o in chunk.pending().items():
                out[p] = min(o, out.get(p, o))
        return out

    def forget_partitions(self, partitions: set[int]) -> None:
        """Drop waiting samples from ``partitions`` (revoked in a rebalance)."""
        kept = [c for c in (ch.without(partitions) for ch in self._chunks) if c is not None]
        self._chunks = deque(kept)
        self._split = {p: s for p, s in self._split.items() if p not in partitions}
        self._size = sum(len(c) for c in kept)
        if self._size == 0:
            self.first_at = None
