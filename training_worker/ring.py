"""The shared-memory ring between the worker and its training process: names and sizes.

Each slot holds one batch of float32 samples; the worker writes a batch into a free slot and
sends the child only the slot's number (see :mod:`oclust.training_worker.trainproc`).

Example:
    >>> ring_slots(8), ring_floats(256, (64,))
    (9, 16384)
"""

from __future__ import annotations

import math
import os
import secrets
from multiprocessing.shared_memory import SharedMemory

import numpy as np

__all__ = ["RING_MAX_BYTES", "RING_PREFIX", "open_ring", "reserved", "ring_floats", "ring_name",
           "ring_slots"]

RING_PREFIX = "oclust-ring"
# /dev/shm of a container is 64 MiB by default, and writing past it is a SIGBUS: large samples
# get fewer slots (the other batches in flight go by pipe)
RING_MAX_BYTES = 32 << 20


def ring_name() -> str:
    """A new ring's name: ``oclust-ring-<worker pid>-<random>`` (in ``/dev/shm`` on Linux)."""
    return f"{RING_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"


def ring_slots(in_flight: int) -> int:
    """Slots of the ring: one per step in flight, and one spare."""
    return in_flight + 1


def ring_floats(batch_size: int, shape: tuple[int, ...]) -> int:
    """float32 values per slot: a full batch of samples of ``shape``."""
    return batch_size * math.prod(shape)


def reserved(ring: SharedMemory) -> SharedMemory:
    """``ring`` with its pages allocated now: a full ``/dev/shm`` is an ``OSError`` here (the
    batches then go by pipe), not a SIGBUS at the first write (unlinked then)."""
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(ring._fd, 0, ring.size)  # type: ignore[attr-defined]
    except OSError:
        ring.close()
        ring.unlink()
        raise
    return ring


def open_ring(batch_size: int, shape: tuple[int, ...], in_flight: int,
              max_bytes: int = RING_MAX_BYTES) -> tuple[SharedMemory, np.ndarray] | None:
    """A new ring for ``in_flight`` batches of samples of ``shape``, reserved: its memory and
    its slots as a (slots, floats) array; at most ``max_bytes``. ``None``: not one batch fits
    (every batch goes by pipe); ``OSError``: no shared memory for it."""
    floats = ring_floats(batch_size, shape)
    slots = min(ring_slots(in_flight), max_bytes // (4 * floats))
    if slots < 1:
        return None
    ring = reserved(SharedMemory(create=True, size=slots * floats * 4, name=ring_name()))
    return ring, np.ndarray((slots, floats), np.float32, ring.buf)
