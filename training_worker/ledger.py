"""The worker's offset ledger: what was fetched, what a snapshot covers, what is in hand.

Per partition of the topic, the ledger knows

* ``consumed`` — the next offset after the last fetched message;
* ``skip_below`` — the resumed snapshot's offset: fetched messages below it are already in the
  model (a crash between publishing a snapshot and committing its offsets replays them);
* ``checkpoint`` — ``{"topic:partition": next offset}`` of the last published snapshot, which
  is also what may be committed, and ``checkpoint_state``, what that snapshot holds beyond its
  offsets (:data:`oclust.model.snapshot.OffsetState`), which a resumed ingest skips;
* the crash-loop marks: the offsets in hand that no snapshot covers are written to the store's
  :class:`~oclust.training_worker.lease.ProgressLog` before they are touched; the next holder of the
  lease reads them back (:meth:`OffsetLedger.read_crash_marks`) and isolates the spans, or
  skips the poison message, that killed its predecessors.

Every method that talks to the progress log is synchronous: the worker calls it in a thread.

Example:
    >>> from types import SimpleNamespace as Msg
    >>> ledger = OffsetLedger("t", checkpoint={"t:0": 5})
    >>> ledger.skip_below[0] = 5
    >>> [m.offset for m in ledger.unseen(0, [Msg(offset=o) for o in range(3, 8)])]
    [5, 6, 7]
    >>> ledger.covered({0: 7})  # offset 7 still waits to be trained
    {'t:0': 7}
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from oclust.training_worker.lease import ProgressLog

__all__ = ["RANGE_CRASHES_BEFORE_ISOLATING", "OffsetLedger"]

V = TypeVar("V")

log = logging.getLogger(__name__)

RANGE_CRASHES_BEFORE_ISOLATING = 2  # deaths on one span before it is taken one at a time


class OffsetLedger:
    """Offsets of one topic's partitions, from fetch to commit (see the module docstring).

    Args:
        topic: the topic trained.
        checkpoint: offsets of the snapshot resumed from (``{"topic:partition": next}``).
        progress: the store's progress log (crash-loop marks); ``None``: nothing is marked.
        max_attempts: deaths of a lone message before it is poison.
    """

    def __init__(self, topic: str, checkpoint: dict[str, int] | None = None,
                 progress: ProgressLog | None = None, max_attempts: int = 3,
                 checkpoint_state: dict[str, dict[str, Any]] | None = None) -> None:
        self.topic = topic
        self.progress = progress
        self.max_attempts = max_attempts
        self.consumed: dict[int, int] = {}
        self.skip_below: dict[int, int] = {}
        self.rewind: dict[int, int] = {}  # partition -> snapshot offset, until its first fetch
        self.checkpoint: dict[str, int] = dict(checkpoint or {})  # published or held
        self.published: dict[str, int] = dict(checkpoint or {})  # the last snapshot's
        self.checkpoint_state: dict[str, dict[str, Any]] = dict(checkpoint_state or {})
        self.mark_lo: dict[int, int] = {}  # per partition: first offset in hand
        self.marked: dict[str, tuple[int, int]] = {}  # what the progress log holds now
        self.isolate: dict[int, tuple[int, int]] = {}  # suspect span per partition
        self.poison: dict[int, int] = {}  # poison offset per partition

    def key(self, partition: int) -> str:
        """``"topic:partition"``."""
        return f"{self.topic}:{partition}"

    def own(self, keyed: Mapping[str, V]) -> dict[int, V]:
        """The entries of ``keyed`` (by "topic:partition") that are this topic's, by partition.

        >>> OffsetLedger("t").own({"t:0": 5, "u:1": 7, "t:x": 9, "t:²": 3})
        {0: 5}
        """
        out = {}
        for key, value in keyed.items():
            topic, _, p = key.rpartition(":")
            if topic == self.topic and p.isascii() and p.isdigit():
                out[int(p)] = value
        return out

    # ------------------------------------------------------------------ fetch
    def unseen(self, partition: int, msgs: list[Any]) -> list[Any]:
        """Drop messages the resumed snapshot already trained on (below its offset)."""
        skip = self.skip_below.get(partition)
        if skip is None or not msgs:
            return msgs
        if msgs[-1].offset + 1 >= skip:
            del self.skip_below[partition]
        self.consumed[partition] = max(self.consumed.get(partition, 0), msgs[-1].offset + 1)
        return [m for m in msgs if m.offset >= skip]

    def rewound(self, partition: int, msgs: list[Any]) -> int | None:
        """Where to seek back to when an assignment's first fetch starts past the snapshot.

        The consumer starts at the group's commit. A snapshot older than the commit (the newer
        versions corrupt, or rolled back) lacks the messages in between: the caller seeks back
        to the returned offset and drops this fetch, which comes again after them. ``None``:
        the fetch stands.
        """
        if not msgs or partition not in self.rewind:
            return None
        target = self.rewind.pop(partition)
        return target if msgs[0].offset > target else None

    def fetched(self, partition: int, next_offset: int) -> None:
        """Everything of ``partition`` below ``next_offset`` was handed to the ingest."""
        self.consumed[partition] = next_offset

    def covered(self, waiting: dict[int, int]) -> dict[str, int]:
        """``{"topic:partition": next offset}`` of everything trained or dead-lettered.

        ``waiting``: per partition, the smallest offset fetched but not trained yet.
        """
        out = dict(self.checkpoint)
        for p, nxt in self.consumed.items():
            key = self.key(p)  # never below the snapshot's own offset (a replay below it)
            out[key] = max(out.get(key, 0), min(nxt, waiting.get(p, nxt)))
        return out

    def forget_partitions(self, partitions: set[int]) -> None:
        """Partitions revoked in a rebalance: their fetch positions no longer apply."""
        for p in partitions:
            self.consumed.pop(p, None)
            self.skip_below.pop(p, None)
            self.rewind.pop(p, None)

    def hold(self, offsets: dict[str, int], state: dict[str, dict[str, Any]]) -> None:
        """The model holds ``offsets`` (and ``state`` beyond them) though no published snapshot
        does: the checkpoint taken as they were revoked was withheld or failed (after one that
        was published: nothing changes). A partition taken up again skips them as it skips a
        resumed snapshot's, not training them twice.

        >>> ledger = OffsetLedger("t", checkpoint={"t:0": 5})
        >>> ledger.hold({"t:0": 9}, {"t:0": {"rows": 2}})
        >>> ledger.checkpoint, ledger.checkpoint_state
        ({'t:0': 9}, {'t:0': {'rows': 2}})
        """
        for key, offset in offsets.items():
            self.checkpoint[key] = offset
            if key in state:
                self.checkpoint_state[key] = state[key]
            else:
                self.checkpoint_state.pop(key, None)

    def reset_partition(self, partition: int, start: int) -> None:
        """A new incarnation of the partition's log: the snapshot's offset no longer applies."""
        self.checkpoint.pop(self.key(partition), None)
        self.published.pop(self.key(partition), None)
        self.checkpoint_state.pop(self.key(partition), None)
        self.skip_below.pop(partition, None)
        self.rewind.pop(partition, None)
        self.mark_lo[partition] = start

    # ------------------------------------------------------------------ crash-loop marks
    def mark(self, his: dict[int, int], firsts: dict[int, int]) -> None:
        """Record in the store what is in hand (since the last snapshot) before touching it.

        ``his``: per partition, the next offset after the fetch; ``firsts``: its first offset.
        """
        for p, first in firsts.items():
            self.mark_lo.setdefault(p, first)
        ranges = dict(self.marked)
        for p, hi in his.items():
            ranges[self.key(p)] = (self.mark_lo[p], hi)
        self._write(ranges)

    def mark_alone(self, partition: int, offset: int) -> None:
        """Mark one suspect message by itself (the rest of the fetch is marked again after)."""
        if self.progress is not None:
            self.progress.mark({self.key(partition): (offset, offset + 1)})

    def remark(self) -> None:
        """Write the current marks again (after a message was marked alone)."""
        if self.marked and self.progress is not None:
            self.progress.mark(self.marked)

    def shrink_marks(self, offsets: dict[str, int]) -> None:
        """A snapshot covering ``offsets`` was published: those are no longer in hand."""
        ranges = {}
        for p, nxt in self.consumed.items():
            key = self.key(p)
            lo = offsets.get(key, self.mark_lo.get(p, nxt))
            self.mark_lo[p] = lo
            if lo < nxt:
                ranges[key] = (lo, nxt)
            if self.progress is not None:
                self.progress.forget_below(key, lo)
        self._write(ranges)

    def clear(self) -> None:
        """Nothing is in hand (a clean stop)."""
        if self.progress is not None:
            self.progress.clear()

    def _write(self, ranges: dict[str, tuple[int, int]]) -> None:
        if ranges != self.marked:
            if self.progress is not None:
                self.progress.mark(ranges)
            self.marked = ranges

    # ------------------------------------------------------------------ crash loops
    def read_crash_marks(self, on_recovery: Callable[[], None] = lambda: None) -> None:
        """Turn the mark a dead lease holder left into spans to isolate or messages to skip.

        A span the previous holders died in twice is taken one message at a time, each message
        marked alone; a message that then kills ``max_attempts`` holders is a poison pill: it
        goes to the DLQ (reason ``poison``) and is skipped. A single kill -9 costs nothing but
        the replay (at-least-once).
        """
        if self.progress is None:
            return
        progress = self.progress
        for part, (lo, hi) in self.own(progress.read()).items():
            key = self.key(part)
            lo = max(lo, int(self.checkpoint.get(key, lo)))  # the snapshot holds those
            if hi <= lo:
                continue
            on_recovery()
            if hi - lo == 1:
                n = progress.bump(f"msg:{key}:{lo}")
                if n >= self.max_attempts:
                    self.poison[part] = lo
                    log.error("%s@%d killed the worker %d times: it goes to the DLQ as poison",
                              key, lo, n)
                    continue
                self.isolate[part] = (lo, hi)
                log.error("%s@%d was in hand when the last worker died (%d of %d attempts): "
                          "retrying it alone", key, lo, n, self.max_attempts)
                continue
            n = progress.bump(f"range:{key}:{lo}")
            if n >= RANGE_CRASHES_BEFORE_ISOLATING:
                self.isolate[part] = (lo, hi)
                log.error("the last %d workers died with %s offsets %d..%d in hand: taking "
                          "them one at a time to find the culprit", n, key, lo, hi - 1)
            else:
                log.warning("the last worker died with %s offsets %d..%d in hand: replaying "
                            "them (at-least-once)", key, lo, hi - 1)

    def is_poison(self, msg: Any) -> bool:
        """``msg`` killed ``max_attempts`` holders."""
        return bool(msg.offset == self.poison.get(msg.partition))

    def is_suspect(self, msg: Any) -> bool:
        """``msg`` lies in its partition's suspect span."""
        span = self.isolate.get(msg.partition)
        return span is not None and span[0] <= msg.offset < span[1]

    def split_suspects(self, partition: int, msgs: list[Any]) -> Sequence[list[Any]]:
        """Runs of ordinary messages, with each suspect (or poison) message on its own."""
        if partition not in self.isolate and partition not in self.poison:
            return [msgs]
        out: list[list[Any]] = []
        for m in msgs:
            if self._alone(m) or not out or (len(out[-1]) == 1 and self._alone(out[-1][0])):
                out.append([m])
            else:
                out[-1].append(m)
        return out

    def _alone(self, m: Any) -> bool:
        return self.is_poison(m) or self.is_suspect(m)

    def trained_alone(self, msg: Any) -> None:
        """A suspect message trained without a crash; the span ends after its last one."""
        self.consumed[msg.partition] = msg.offset + 1
        lo, hi = self.isolate[msg.partition]
        if msg.offset + 1 >= hi:
            del self.isolate[msg.partition]
            log.info("suspect span %s:%d..%d trained without a crash", msg.topic,
                     msg.partition, lo, hi - 1)

    def skipped_poison(self, msg: Any) -> None:
        """The poison message went to the DLQ."""
        del self.poison[msg.partition]
