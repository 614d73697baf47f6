"""The training process's side of :mod:`oclust.training_worker.trainproc`: the model and its
commands.

:func:`child_main` builds the model (a fresh one from the settings, or the snapshot's) and
answers the worker's commands, one reply each, in order: ``ring_`` (attach the shared-memory
ring), ``step``, ``snapshot``, ``restore`` and ``close``. Replies travel in lists: while more
steps wait in the pipe, up to ``REPLIES_PER_SEND`` step replies go in one message (each send
wakes the worker's process, a cost comparable to a few percent of a CPU step); any other
command, or an empty pipe, sends at once. It ignores SIGINT/SIGTERM (the worker decides when
training ends) and returns when the worker's end of the pipe closes, unlinking the ring the
dead worker can no longer unlink.

Example:
    >>> import numpy as np
    >>> from oclust.training_worker.settings import WorkerSettings
    >>> child = ModelOwner(WorkerSettings(n_clusters=2, latent_dim=4, device="cpu"), None)
    >>> report, refusal, seconds, facts = child.step(-1, (8, 3), np.ones((8, 3), np.float32))
    >>> report.n, refusal, facts[:3]
    (8, None, (8, 1, True))
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import traceback
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from oclust.model import OnlineClusterer, Snapshot
from oclust.model.snapshot import OffsetState
from oclust.training_worker.resume import fresh_model
from oclust.training_worker.settings import WorkerSettings
from oclust.training_worker.trainer import MODEL_FAULTS

__all__ = ["REPLIES_PER_SEND", "Facts", "ModelOwner", "child_main"]

# Step replies sent together while more steps wait: fewer wake-ups of the worker, and the
# worker still hears of every step within a few steps (its ring has STEPS_AHEAD slots).
REPLIES_PER_SEND = 4

Facts = tuple[int, int, bool, np.ndarray]  # samples_seen, steps, fitted, prior


def _facts(model: OnlineClusterer) -> Facts:
    return model.samples_seen_, model.steps_, model.is_fitted, np.asarray(model.prior_)


class ModelOwner:
    """The model's owner in the training process: one method per command."""

    def __init__(self, settings: WorkerSettings, snapshot: Snapshot | None) -> None:
        s = settings
        self.device = s.device
        self.model = (fresh_model(s) if snapshot is None
                      else OnlineClusterer.from_snapshot(snapshot, device=s.device, verify=False))
        self.ring: SharedMemory | None = None
        self.slots: np.ndarray | None = None

    def ring_(self, name: str, slots: int, floats: int) -> None:
        self.ring = SharedMemory(name=name)
        self.slots = np.ndarray((slots, floats), np.float32, self.ring.buf)

    def step(self, slot: int, shape: tuple[int, ...], x: np.ndarray | None) -> Any:
        if x is None:  # a view of the slot: torch trains on the shared memory itself
            assert self.slots is not None
            x = self.slots[slot, : math.prod(shape)].reshape(shape)
        t0 = time.perf_counter()
        try:
            report = self.model.partial_fit(x).last_step_
        except ValueError as exc:
            return None, str(exc), 0.0, _facts(self.model)
        return report, None, time.perf_counter() - t0, _facts(self.model)

    def snapshot(self, offsets: dict[str, int], metrics: dict[str, Any],
                 offset_state: OffsetState | None = None) -> Snapshot:
        return self.model.to_snapshot(offsets=offsets, metrics=metrics, offset_state=offset_state)

    def restore(self, weights_path: str, manifest: str) -> Facts:
        snapshot = Snapshot.from_parts(Path(weights_path).read_bytes(), manifest)
        self.model = OnlineClusterer.from_snapshot(snapshot, device=self.device, verify=False)
        return _facts(self.model)

    def close(self, export: bool) -> Snapshot | None:
        return self.model.to_snapshot() if export and self.model.is_fitted else None

    def release(self, unlink: bool) -> None:
        if self.ring is not None:
            self.slots = None
            with contextlib.suppress(BufferError):  # a view still held: unmapped at exit
                self.ring.close()
            if unlink:  # the worker is gone: nobody else will
                with contextlib.suppress(FileNotFoundError):
                    self.ring.unlink()


def child_main(conn: Connection, settings: WorkerSettings, snapshot: Snapshot | None) -> None:
    """The training process: build the model, then answer commands until told to close."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the worker decides when training ends
        signal.signal(sig, signal.SIG_IGN)
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    child, orphaned = None, True
    try:
        try:
            child = ModelOwner(settings, snapshot)
            conn.send([("ok", _facts(child.model))])
        except Exception:
            conn.send([("error", traceback.format_exc())])
            return
        replies: list[tuple[str, Any]] = []  # not sent yet, in order
        while True:
            cmd, *args = conn.recv()
            try:
                status, out = "ok", getattr(child, cmd)(*args)
            except MODEL_FAULTS as exc:  # the model is broken, not the message: no crash
                status, out = "fault", (f"{type(exc).__name__}: {exc}", traceback.format_exc())
            except Exception:
                status, out = "error", traceback.format_exc()
            replies.append((status, out))
            if cmd != "step" or len(replies) >= REPLIES_PER_SEND or not conn.poll():
                conn.send(replies)
                replies = []
            if cmd == "close" and status == "ok":
                orphaned = False
                return
    except (EOFError, OSError):
        return  # the worker died (kill -9): nothing to train for
    finally:
        if child is not None:
            child.release(unlink=orphaned)
