"""Ingest strategies: fetched messages of one partition → decoded samples in the queue.

Two modes, one :class:`Ingest` Protocol: :class:`SampleIngest` (one message is one sample, or
a float32 matrix of several) and :class:`ReadingIngest` (one message is one reading of a
device; sliding windows of readings are the samples). Both are synchronous and never raise on
a message: a message that fails is returned with its :class:`DecodeError` for the DLQ.

Example:
    >>> import json
    >>> from types import SimpleNamespace as Msg
    >>> ingest = SampleIngest(SampleDecoder(), SampleQueue())
    >>> msgs = [Msg(offset=7, value=json.dumps({"features": [1.0, 2.0]}).encode(), headers=[]),
    ...         Msg(offset=8, value=b"{", headers=[])]
    >>> [(m.offset, err.reason) for m, err in ingest.decode(0, msgs)]
    [(8, 'not_json')]
    >>> len(ingest.queue), ingest.pending()
    (1, {0: 7})
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
from typing import Any, Protocol

import numpy as np

from oclust.training_worker.batching import SampleQueue
from oclust.training_worker.codec import DecodedBatch, DecodeError, ReadingDecoder, SampleDecoder
from oclust.training_worker.settings import WorkerSettings
from oclust.training_worker.windows import WindowAssembler

__all__ = ["Ingest", "ReadingIngest", "Rejects", "SampleIngest", "make_ingest"]

log = logging.getLogger(__name__)

Rejects = list[tuple[Any, DecodeError]]  # (message, why) pairs for the dead-letter topic


class Ingest(Protocol):
    """Decode a partition's messages into :attr:`queue`; know what still waits untrained."""

    queue: SampleQueue

    @property
    def settled(self) -> bool:
        """The input layout (sample shape, channel count) is known."""
        ...

    def settle(self, msgs: list[Any]) -> None:
        """A fresh model's input layout from its first fetch, every partition's messages: the
        one most of the valid ones have."""
        ...

    def decode(self, partition: int, msgs: list[Any]) -> Rejects:
        """Queue the samples of ``msgs`` (in order); return the rejected messages."""
        ...

    def pending(self) -> dict[int, int]:
        """Per partition, the smallest offset fetched but not trained yet."""
        ...

    def resume_state(self, covered: dict[int, int], consumed: dict[int, int]
                     ) -> dict[int, dict[str, Any]]:
        """Per partition, what the trained model holds beyond its ``covered`` offset (fetched up
        to ``consumed``), for a resumed worker to skip (``OffsetState`` of the snapshot)."""
        ...

    def resume_from(self, partition: int, offset: int, state: dict[str, Any] | None) -> None:
        """The partition restarts at ``offset`` from a snapshot holding ``state`` beyond it:
        skip that when it comes (``None``: nothing to skip)."""
        ...

    def forget_partitions(self, partitions: set[int]) -> None:
        """Drop what waits from ``partitions`` (revoked in a rebalance)."""
        ...


class SampleIngest:
    """Sample messages: decoded in one batch, one offset per sample (rows share theirs)."""

    def __init__(self, decoder: SampleDecoder, queue: SampleQueue) -> None:
        self.decoder = decoder
        self.queue = queue
        self._skip: dict[int, tuple[int, int]] = {}  # partition -> (offset, rows to drop)

    @property
    def settled(self) -> bool:
        """The sample shape is known."""
        return self.decoder.shape is not None

    def settle(self, msgs: list[Any]) -> None:
        """Settle the sample shape on the one most of ``msgs`` have."""
        self.decoder.settle_shape([m.value for m in msgs], [m.headers for m in msgs])

    def decode(self, partition: int, msgs: list[Any]) -> Rejects:
        """Queue the samples of ``msgs`` (in order); return the rejected messages."""
        try:
            batch = self.decoder.decode_batch([m.value for m in msgs],
                                              [m.headers for m in msgs])
        except Exception:  # the decoder promises DecodeError only; never die on a message
            log.exception("batch decode failed: decoding %d messages one by one", len(msgs))
            batch = self._decode_each(msgs)
        if len(batch.index):
            # one offset per sample: a multi-sample message's rows share its offset
            offsets = np.fromiter((m.offset for m in msgs), np.int64, len(msgs))[batch.index]
            keep = self._unskipped(partition, offsets, msgs[-1].offset)
            self.queue.put(batch.features[keep], batch.labels[keep], partition, offsets[keep])
        return [(msgs[i], err) for i, err in batch.rejects]

    def _unskipped(self, partition: int, offsets: np.ndarray, last: int) -> slice | np.ndarray:
        """The samples to queue: all but the first rows of a message a snapshot holds in part."""
        skip = self._skip.get(partition)
        if skip is None:
            return slice(None)
        offset, rows = skip
        if last >= offset:  # the message was in this fetch (or is gone): skip once
            del self._skip[partition]
        first = int(np.searchsorted(offsets, offset))
        if first == len(offsets) or offsets[first] != offset:
            return slice(None)
        keep = np.ones(len(offsets), bool)
        keep[first : first + rows] = False
        self.queue.taken_before(partition, offset, rows)  # a later cut of it adds to them
        log.info("skipping the first %d rows of message %d of partition %d: the resumed "
                 "snapshot holds them", rows, offset, partition)
        return keep

    def resume_state(self, covered: dict[int, int], consumed: dict[int, int]
                     ) -> dict[int, dict[str, Any]]:
        """``{"rows": r}`` where the first r rows of the message at the covered offset are
        trained (a multi-sample message cut between batches), or were, by the resumed snapshot,
        and the message has not come again yet."""
        held = {**self._skip, **self.queue.split_rows()}
        return {p: {"rows": rows} for p, (offset, rows) in held.items()
                if covered.get(p) == offset}

    def resume_from(self, partition: int, offset: int, state: dict[str, Any] | None) -> None:
        """Drop the first ``state["rows"]`` rows of the message at ``offset`` when it comes."""
        rows = (state or {}).get("rows", 0)
        if rows > 0:
            self._skip[partition] = (offset, rows)
        else:
            self._skip.pop(partition, None)

    def _decode_each(self, msgs: list[Any]) -> DecodedBatch:
        """One message at a time; any exception is that message's ``decode_failed``."""
        feats, labels, index, rejects = [], [], [], []
        for i, m in enumerate(msgs):
            try:  # decode_batch, not decode: a multi-sample message keeps all its rows
                one = self.decoder.decode_batch([m.value], [m.headers])
            except Exception as exc:
                rejects.append((i, DecodeError("decode_failed", f"{type(exc).__name__}")))
                continue
            rejects += [(i, err) for _, err in one.rejects]
            if len(one.index):
                feats.append(one.features)
                labels.append(one.labels)
                index.append(np.full(len(one.index), i, np.int64))
        if not feats:
            shape = self.decoder.shape or (0,)
            return DecodedBatch(np.empty((0, *shape), np.float32), np.empty(0, np.int64),
                                np.empty(0, np.int64), rejects)
        return DecodedBatch(np.concatenate(feats), np.concatenate(labels),
                            np.concatenate(index), rejects)

    def pending(self) -> dict[int, int]:
        """Per partition, the smallest offset fetched but not trained yet."""
        return self.queue.pending()

    def forget_partitions(self, partitions: set[int]) -> None:
        """Drop what waits from ``partitions``."""
        self.queue.forget_partitions(partitions)
        self._skip = {p: s for p, s in self._skip.items() if p not in partitions}


class ReadingIngest:
    """Reading messages: per-device windows, each pinned to the offsets of its readings."""

    def __init__(self, decoder: ReadingDecoder, assembler: WindowAssembler,
                 queue: SampleQueue) -> None:
        self.decoder = decoder
        self.assembler = assembler
        self.queue = queue
        self._replay: dict[int, tuple[int, list[list[int]]]] = {}  # partition -> (until, spans)

    @property
    def settled(self) -> bool:
        """The channel count is known."""
        return self.decoder.channels is not None

    def settle(self, msgs: list[Any]) -> None:
        """Settle the channel count on the one most of ``msgs`` have."""
        self.decoder.settle_channels([m.value for m in msgs], [m.headers for m in msgs],
                                     [m.key for m in msgs])

    def decode(self, partition: int, msgs: list[Any]) -> Rejects:
        """Queue the windows ``msgs`` complete; return the rejected messages."""
        windows, rejects = [], []
        if self.decoder.channels is None and len(msgs) > 1:
            with contextlib.suppress(Exception):  # never die on a message: each is judged below
                self.settle(msgs)
        replay = self._replay.get(partition)
        ended = replay is not None and bool(msgs) and msgs[-1].offset + 1 >= replay[0]
        if ended:
            del self._replay[partition]  # this fetch reaches past what the snapshot held
        until, spans = replay if replay is not None else (-1, [])
        for m in msgs:
            replayed = m.offset < until
            if ended and not replayed:  # the replay ends here, not at the end of the fetch
                self.assembler.end_replay(partition)
                ended = False
            if replayed and not _within(m.offset, spans):  # trained (or dead-lettered) before
                self._pass_over(m)
                continue
            try:
                reading = self.decoder.decode(m.value, m.headers, m.key)
                windows += self.assembler.push(reading, (partition, m.offset), replayed)
            except DecodeError as err:
                rejects.append((m, err))
            except Exception as exc:
                rejects.append((m, DecodeError("decode_failed", type(exc).__name__)))
        if ended:
            self.assembler.end_replay(partition)
        if windows:
            self.queue.put_pinned(
                np.stack([w.data for w in windows]),
                np.array([w.label for w in windows], np.int64),
                [w.sources for w in windows],
                [w.held for w in windows],
            )
        return rejects

    def _pass_over(self, m: Any) -> None:
        """A replayed reading that waits in no window counts as a push again: for the idle
        devices, and with gaps between windows it may have been one of a gap's readings (a
        waiting window formed again reopens its gap, which those readings closed)."""
        if self.assembler.hop <= self.assembler.size and self.assembler.idle_after is None:
            return  # no gaps, no idle devices: nothing to count
        with contextlib.suppress(Exception):  # judged (or dead-lettered) the first time
            self.assembler.pass_over(self.decoder.decode(m.value, m.headers, m.key))

    def pending(self) -> dict[int, int]:
        """Per partition, the smallest offset in a queued window or a device's buffer."""
        waiting = self.queue.pending()
        for p, o in self.assembler.pending().items():
            waiting[p] = min(o, waiting.get(p, o))
        return waiting

    def resume_state(self, covered: dict[int, int], consumed: dict[int, int]
                     ) -> dict[int, dict[str, Any]]:
        """``{"until": consumed, "waiting": spans}`` where readings fetched above the covered
        offset went into trained windows: only those in the ``[lo, hi)`` spans (in a device's
        buffer or a queued window) still wait; the others are trained, dead-lettered or dropped.
        """
        waiting: dict[int, set[int]] = {}
        for p, o in (*self.assembler.buffered_sources(), *self.queue.held()):
            waiting.setdefault(p, set()).add(o)
        out = {}
        for p, lo in covered.items():
            until = consumed.get(p, lo)
            spans = _spans(sorted(waiting.get(p, ())))
            if p in self._replay:  # the resumed snapshot's account of what is not fetched yet
                old_until, old_spans = self._replay[p]
                spans += [[max(a, until), b] for a, b in old_spans if b > until]
                until = max(until, old_until)
            if until > lo:  # something fetched above the covered offset
                out[p] = {"until": until, "waiting": spans}
        return out

    def resume_from(self, partition: int, offset: int, state: dict[str, Any] | None) -> None:
        """Of the messages in ``[offset, state["until"])``, decode only the waiting ones."""
        if state and "until" in state:
            self._replay[partition] = (int(state["until"]), list(state.get("waiting", [])))
        else:
            self._replay.pop(partition, None)

    def forget_partitions(self, partitions: set[int]) -> None:
        """Drop queued windows and buffered readings from ``partitions``."""
        self._replay = {p: r for p, r in self._replay.items() if p not in partitions}
        self.queue.forget_partitions(partitions)
        self.assembler.forget_partitions(partitions)


def _spans(offsets: list[int]) -> list[list[int]]:
    """Sorted offsets as ``[lo, hi)`` runs: ``[3, 4, 5, 9]`` -> ``[[3, 6], [9, 10]]``."""
    spans: list[list[int]] = []
    for o in offsets:
        if spans and spans[-1][1] == o:
            spans[-1][1] = o + 1
        else:
            spans.append([o, o + 1])
    return spans


def _within(offset: int, spans: list[list[int]]) -> bool:
    i = bisect.bisect_right(spans, [offset, math.inf]) - 1
    return i >= 0 and spans[i][0] <= offset < spans[i][1]


def make_ingest(settings: WorkerSettings, shape: tuple[int, ...] | None) -> Ingest:
    """The strategy of ``settings.mode`` for a model taking samples of ``shape`` (or unfitted).

    Raises:
        ValueError: readings mode, but the model's samples are not (channels, window_size).
    """
    s = settings
    queue = SampleQueue()
    if s.mode == "samples":
        return SampleIngest(SampleDecoder(shape, s.max_message_bytes, s.encoding,
                                          s.max_abs_feature), queue)
    if shape is not None and (len(shape) != 2 or shape[1] != s.window_size):
        raise ValueError(
            f"the snapshot's model takes samples of shape {shape}, but readings mode "
            f"with --window-size {s.window_size} makes (channels, {s.window_size})"
        )
    decoder = ReadingDecoder(shape[0] if shape else None, s.max_message_bytes, s.encoding,
                             s.max_abs_feature)
    return ReadingIngest(decoder, WindowAssembler(s.window_size, s.window_hop, s.idle_after),
                         queue)
