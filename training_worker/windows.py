"""Per-device sliding windows: raw sensor readings (C values each) → C×T samples.

Each device (the reading's ``device``, else the message key) has its own buffer, kept in time
order (``ts``; arrival order for equal or missing times). When a buffer holds ``size`` readings
the window ``(C, size)`` of the oldest ones is emitted and the buffer advances by ``hop``.
A reading older than the start of its device's buffer once a window has been emitted is
*late*: its window is gone, so it is rejected (``DecodeError("late_reading")``).

Every reading may carry a ``source`` (Kafka partition, offset). :meth:`WindowAssembler.pending`
tells, per partition, the smallest offset still needed by a buffered reading, so the worker
never commits past readings that have not yet made it into a trained window (at-least-once).

Example:
    >>> import numpy as np
    >>> from oclust.training_worker.codec import Reading
    >>> asm = WindowAssembler(size=3, hop=2)
    >>> out = [w for t in range(7)
    ...        for w in asm.push(Reading("a", float(t), np.array([t, -t], np.float32)))]
    >>> [w.data.shape for w in out], out[1].data[0].tolist()
    ([(2, 3), (2, 3), (2, 3)], [2.0, 3.0, 4.0])
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from oclust.model.validation import check_positive
from oclust.training_worker.codec import DecodeError, Reading

__all__ = ["Window", "WindowAssembler"]

Source = tuple[int, int]  # (partition, offset)


@dataclass(frozen=True)
class Window:
    """``data`` (C, T) float32 from ``device`` covering ``start_ts``..``end_ts``.

    ``label`` is the majority label of the readings (-1 if none had one); ``sources`` maps each
    Kafka partition the readings came from to the smallest offset among them, and ``held``
    lists the (partition, offset) of every reading that had a source.
    """

    device: str
    data: np.ndarray
    start_ts: float | None
    end_ts: float | None
    label: int = -1
    sources: dict[int, int] = field(default_factory=dict)
    held: tuple[Source, ...] = ()


@dataclass
class _Entry:
    key: float
    seq: int
    reading: Reading
    source: Source | None
    replayed: bool = False  # a resumed worker's waiting reading, until its replay ends or it
    # is in a window again

    def __lt__(self, other: _Entry) -> bool:
        return (self.key, self.seq) < (other.key, other.seq)


@dataclass
class _Device:
    buffer: list[_Entry] = field(default_factory=list)
    emitted: bool = False
    last_out: _Entry | None = None  # the newest reading a window took out of the buffer
    skip: int = 0  # readings still to drop when hop > size
    last_push: int = 0


def _key(reading: Reading) -> float:
    """A reading's place in its device's buffer: its time (no time: after every timed one)."""
    return float("inf") if reading.ts is None else reading.ts


def _late_against(state: _Device, entry: _Entry) -> _Entry | None:
    """The reading ``entry`` is late against (``None``: not late): older than the open window,
    or, none open (hop >= size), than the last window."""
    floor = state.buffer[0] if state.buffer else state.last_out
    return floor if state.emitted and floor is not None and entry < floor else None


class WindowAssembler:
    """Assemble per-device sliding windows of ``size`` readings, advancing by ``hop``.

    Args:
        size: T, readings per window.
        hop: readings between window starts (default ``size``: no overlap).
        idle_after: drop a device's partial buffer when it has received nothing during this
            many pushes to the assembler (``None``: never), so a silent device does not hold
            the committed offsets back forever. A resumed worker's replay counts the readings
            it passes over (:meth:`pass_over`), as they were pushes the first time.
    """

    def __init__(self, size: int, hop: int | None = None, idle_after: int | None = None) -> None:
        check_positive(size=size, hop=hop, idle_after=idle_after)
        self.size = size
        self.hop = size if hop is None else hop
        self.idle_after = idle_after
        self._devices: dict[str, _Device] = {}
        self._pushes = 0
        self._seq = 0
        self.dropped_idle = 0

    @property
    def devices(self) -> int:
        """Devices with state."""
        return len(self._devices)

    def buffered(self, device: str) -> int:
        """Readings waiting in ``device``'s buffer."""
        state = self._devices.get(device)
        return len(state.buffer) if state else 0

    def push(self, reading: Reading, source: Source | None = None,
             replayed: bool = False) -> list[Window]:
        """Add one reading; return the windows it completes (oldest first).

        ``replayed``: a reading a resumed worker replays because it was still waiting (in a
        buffer or an untrained window) is never part of a gap between windows (``hop > size``):
        the gap's readings are not replayed, so the count would swallow the waiting ones. Nor
        is it late: it was taken in the first time, and the windows cut since the resume (from
        other partitions' readings first, say) may have passed it.
        """
        state = self._pushed(reading.device)
        if state is None:
            state = self._devices[reading.device] = _Device(last_push=self._pushes)
        if replayed:
            state.skip = 0
        self._seq += 1
        entry = _Entry(_key(reading), self._seq, reading, source, replayed)
        buf = state.buffer
        floor = None if replayed else _late_against(state, entry)
        if floor is not None:
            raise DecodeError(
                "late_reading",
                f"reading at ts={reading.ts} for device {reading.device!r} is older than its "
                f"{'open' if buf else 'last'} window (ts={floor.reading.ts})",
            )
        if state.skip:
            state.skip -= 1
            return []
        bisect.insort(buf, entry)
        out = []
        while len(buf) >= self.size:
            out.append(self._window(reading.device, buf[: self.size]))
            for e in buf[: self.size]:
                e.replayed = False  # its window formed again: it may go idle like the others
            state.emitted = True
            drop = min(self.hop, len(buf))
            state.last_out = buf[drop - 1]
            del buf[:drop]
            state.skip = self.hop - drop
        return out

    def pass_over(self, reading: Reading) -> None:
        """Count ``reading`` as a push without taking it: a resumed worker's replay of a reading
        trained, dropped or dead-lettered the first time. It was a push then, which its device's
        idle count and the idle checks saw, and may have been one of its device's gap between
        windows (``hop > size``): it counts into that gap again, unless it was late then.
        """
        state = self._pushed(reading.device)
        if state is None or not state.skip:
            return
        if _late_against(state, _Entry(_key(reading), self._seq + 1, reading, None)) is None:
            state.skip -= 1

    def _window(self, device: str, entries: list[_Entry]) -> Window:
        data = np.stack([e.reading.values for e in entries], axis=1).astype(np.float32)
        labels = [e.reading.label for e in entries if e.reading.label >= 0]
        label = Counter(labels).most_common(1)[0][0] if labels else -1
        sources: dict[int, int] = {}
        for e in entries:
            if e.source is not None:
                p, o = e.source
                sources[p] = min(o, sources.get(p, o))
        held = tuple(e.source for e in entries if e.source is not None)
        return Window(device, data, entries[0].reading.ts, entries[-1].reading.ts, label, sources,
                      held)

    def _pushed(self, device: str) -> _Device | None:
        """Count a push for ``device`` and drop the devices idle since; ``device``'s state, if
        it has one, now the last of ``_devices`` (which runs from the least recently pushed).

        Checked at every push, not every ``idle_after``: where a device goes idle then depends
        on the pushes alone, so a resumed worker's replay drops it where the first run did.
        """
        self._pushes += 1
        state = self._devices.pop(device, None)
        if state is not None:
            state.last_push = self._pushes
            self._devices[device] = state
        if self.idle_after is None:
            return state
        idle, kept = [], []
        for d, s in self._devices.items():
            if self._pushes - s.last_push < self.idle_after:
                break
            # a replayed reading's window has to form again: kept, and looked at after the others
            (kept if any(e.replayed for e in s.buffer) else idle).append(d)
        for d in idle:
            self.dropped_idle += len(self._devices.pop(d).buffer)
        for d in kept:
            self._devices[d] = self._devices.pop(d)
        return state

    def end_replay(self, partition: int) -> None:
        """``partition``'s replay is over: its replayed readings may go idle like the others
        (kept until then, or until they are in a window again: a window they were in before the
        resume must form again, though other partitions' pushes come between differently)."""
        for state in self._devices.values():
            for e in state.buffer:
                if e.source is not None and e.source[0] == partition:
                    e.replayed = False

    def pending(self) -> dict[int, int]:
        """Per partition, the smallest offset of a reading still waiting in some buffer."""
        out: dict[int, int] = {}
        for state in self._devices.values():
            for e in state.buffer:
                if e.source is not None:
                    p, o = e.source
                    out[p] = min(o, out.get(p, o))
        return out

    def buffered_sources(self) -> list[Source]:
        """(partition, offset) of every buffered reading that has a source."""
        return [e.source for s in self._devices.values() for e in s.buffer if e.source is not None]

    def forget_partitions(self, partitions: set[int]) -> None:
        """Drop buffered readings that came from ``partitions`` (after they were revoked)."""
        for d in list(self._devices):
            state = self._devices[d]
            kept = [e for e in state.buffer if e.source is None or e.source[0] not in partitions]
            if len(kept) < len(state.buffer) and not kept:
                del self._devices[d]  # a device of the revoked partitions only
            state.buffer = kept
