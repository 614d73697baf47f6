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

import logging
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

    def decode(self, partition: int, msgs: list[Any]) -> Rejects:
        """Queue the samples of ``msgs`` (in order); return the rejected messages."""
        ...

    def pending(self) -> dict[int, int]:
        """Per partition, the smallest offset fetched but not trained yet."""
        ...

    def forget_partitions(self, partitions: set[int]) -> None:
        """Drop what waits from ``partitions`` (revoked in a rebalance)."""
        ...


class SampleIngest:
    """Sample messages: decoded in one batch, one offset per sample (rows share theirs)."""

    def __init__(self, decoder: SampleDecoder, queue: SampleQueue) -> None:
        self.decoder = decoder
        self.queue = queue

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
            self.queue.put(batch.features, batch.labels, partition, offsets)
        return [(msgs[i], err) for i, err in batch.rejects]

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


class ReadingIngest:
    """Reading messages: per-device windows, each pinned to the offsets of its readings."""

    def __init__(self, decoder: ReadingDecoder, assembler: WindowAssembler,
                 queue: SampleQueue) -> None:
        self.decoder = decoder
        self.assembler = assembler
        self.queue = queue

    def decode(self, partition: int, msgs: list[Any]) -> Rejects:
        """Queue the windows ``msgs`` complete; return the rejected messages."""
        windows, rejects = [], []
        for m in msgs:
            try:
                reading = self.decoder.decode(m.value, m.headers, m.key)
                windows += self.assembler.push(reading, (partition, m.offset))
            except DecodeError as err:
                rejects.append((m, err))
            except Exception as exc:
                rejects.append((m, DecodeError("decode_failed", type(exc).__name__)))
        if windows:
            self.queue.put_pinned(
                np.stack([w.data for w in windows]),
                np.array([w.label for w in windows], np.int64),
                [w.sources for w in windows],
            )
        return rejects

    def pending(self) -> dict[int, int]:
        """Per partition, the smallest offset in a queued window or a device's buffer."""
        waiting = self.queue.pending()
        for p, o in self.assembler.pending().items():
            waiting[p] = min(o, waiting.get(p, o))
        return waiting

    def forget_partitions(self, partitions: set[int]) -> None:
        """Drop queued windows and buffered readings from ``partitions``."""
        self.queue.forget_partitions(partitions)
        self.assembler.forget_partitions(partitions)


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
