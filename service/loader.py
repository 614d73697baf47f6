"""Loaded models, the holder the HTTP app reads, and the watcher that hot-reloads snapshots.

* :class:`LoadedModel` — an immutable, ready-to-serve model built from a verified snapshot: the
  model's exported serving pipeline (:func:`oclust.model.inference.load`: a numba kernel for MLP
  encoders, built without importing torch; torch for the others), the manifest (and its JSON,
  pre-rendered).
* :class:`ModelHolder` — one reference to the current :class:`LoadedModel`. A swap is a single
  attribute assignment, so a request that read ``holder.current`` once uses exactly one model
  from start to end: no request ever sees half a model.
* :class:`SnapshotWatcher` — a background thread that loads the store's current version at start
  and then waits for changes (``NS:events`` pub/sub with polling, via
  ``SnapshotStore.wait_for_change``), verifies each snapshot's checksums (weights and manifest)
  once, as the store reads it, and swaps it in. While the store is unreachable or holds garbage
  it keeps the last good model, backs off exponentially and reports ``store_up = False``
  (unreachable) or ``last_error``.

Only the watcher talks to the store; the HTTP app needs just this module's holder and ``model``.

Example:
    >>> import numpy as np
    >>> from oclust.model import OnlineClusterer
    >>> clf = OnlineClusterer(n_clusters=2, latent_dim=4, seed=0, device="cpu")
    >>> _ = clf.partial_fit(np.random.default_rng(0).normal(size=(64, 3)).astype("float32"))
    >>> holder = ModelHolder()
    >>> holder.swap(LoadedModel.from_snapshot(clf.to_snapshot().with_version(7)))
    >>> holder.current.version, holder.current.assign(np.zeros((1, 3), "float32")).labels.shape
    (7, (1,))
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from oclust.model.inference import Assignment, Inference, load
from oclust.model.priors import resolve_prior
from oclust.model.snapshot import Snapshot, SnapshotError
from oclust.training_worker.store import CorruptPointer, SnapshotStore, StoreError, VersionNotFound

if TYPE_CHECKING:
    from oclust.service.settings import ServiceSettings

__all__ = ["Assignment", "LoadedModel", "ModelHolder", "SnapshotWatcher"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """An immutable model ready to serve; build it with :meth:`from_snapshot`."""

    version: int
    sha256: str
    manifest: Mapping[str, Any]
    manifest_json: bytes
    n_clusters: int
    input_shape: tuple[int, ...]
    prior: np.ndarray
    created_at: float | None
    loaded_at: float
    infer: Inference

    @classmethod
    def from_snapshot(
        cls, snapshot: Snapshot, device: str = "cpu", verify: bool = True,
        torch_threads: int | None = None,
    ) -> LoadedModel:
        """Build the snapshot's serving pipeline; :class:`SnapshotError` if it is bad.

        ``verify=False`` for a snapshot whose checksums were verified already (by the store
        that read it): a snapshot is verified once. ``device`` matters only for a model served by
        torch; ``torch_threads`` sets its threads, or the compiled kernel's BLAS threads (see
        :func:`oclust.model.inference.load`).
        """
        infer = load(snapshot, device=device, verify=verify, torch_threads=torch_threads)
        manifest = json.loads(snapshot.manifest_json())  # a private deep copy
        return cls(
            version=snapshot.version,
            sha256=snapshot.sha256,
            manifest=MappingProxyType(manifest),
            manifest_json=snapshot.manifest_json().encode(),
            n_clusters=infer.n_clusters,
            input_shape=infer.input_shape,
            prior=_prior(manifest.get("prior"), infer.n_clusters),
            created_at=snapshot.meta.created_at,
            loaded_at=time.time(),
            infer=infer,
        )

    @property
    def input_size(self) -> int:
        """Numbers in one sample (the product of ``input_shape``)."""
        return int(np.prod(self.input_shape))

    def assign(self, batch: np.ndarray) -> Assignment:
        """Served cluster of each sample of a validated float32 batch (N, *input_shape)."""
        return self.infer(batch)


def _prior(value: Any, n_clusters: int) -> np.ndarray:
    """The manifest's prior (the estimate at snapshot time for an online prior), read-only."""
    try:
        prior = resolve_prior(value, n_clusters)[1]
    except ValueError as exc:
        raise SnapshotError(f"manifest has a bad prior: {exc}") from exc
    if prior is None:
        raise SnapshotError("manifest has no prior vector")
    prior = prior.copy()
    prior.setflags(write=False)
    return prior


class _Status:
    """A status attribute of :class:`ModelHolder`: a change wakes ``wait_until``'s waiters."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attribute = f"_{name}"

    def __get__(self, holder: ModelHolder | None, owner: type | None = None) -> Any:
        return self if holder is None else getattr(holder, self.attribute)

    def __set__(self, holder: ModelHolder, value: object) -> None:
        holder._change(self.attribute, value)


class ModelHolder:
    """The current :class:`LoadedModel` (or ``None``), plus the store's health as last seen.

    Read ``holder.current`` once per request; :meth:`swap` replaces it with one reference
    assignment after telling the listeners (e.g. the monitor) about the new model.

    Example:
        >>> holder = ModelHolder()
        >>> holder.current is None, holder.not_ready_reason()
        (True, 'no snapshot loaded yet')
    """

    def __init__(self) -> None:
        self._current: LoadedModel | None = None
        self._listeners: list[Callable[[LoadedModel], None]] = []
        self._changed = threading.Condition()
        self._store_up: bool | None = None
        self._last_error: str | None = None
        self._fallback: str | None = None

    @property
    def current(self) -> LoadedModel | None:
        """The model to serve now."""
        return self._current

    store_up = _Status()
    """Whether the store answered the last attempt (``None``: no store attached yet)."""
    last_error = _Status()
    """Why the latest load attempt failed (cleared by a successful swap, or once the store
    answers again with the served version still pointed)."""
    fallback = _Status()
    """Why the served model is not the pointed version (``None``: it is)."""

    def _change(self, attribute: str, value: object) -> None:
        """Set a status attribute and wake :meth:`wait_until`'s waiters, when it changes."""
        if value != getattr(self, attribute):
            with self._changed:
                setattr(self, attribute, value)
                self._changed.notify_all()

    def subscribe(self, listener: Callable[[LoadedModel], None]) -> None:
        """Call ``listener(model)`` before each swap (and now, if a model is loaded)."""
        self._listeners.append(listener)
        current = self._current
        if current is not None:
            listener(current)

    def swap(self, model: LoadedModel, fallback: str | None = None) -> None:
        """Make ``model`` the current one (atomically for readers).

        ``fallback`` says why it is not the version the store points at, when it is not.
        """
        for listener in list(self._listeners):
            listener(model)
        with self._changed:
            self._current = model
            self._fallback = fallback
            self._last_error = None
            self._changed.notify_all()

    def wait_until(self, predicate: Callable[[ModelHolder], bool], timeout: float) -> bool:
        """Block until ``predicate(holder)`` holds (re-checked on every swap and status change)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until the current model has ``version``; False on timeout."""
        return self.wait_until(
            lambda h: h.current is not None and h.current.version == version, timeout
        )

    def not_ready_reason(self) -> str | None:
        """Why the service cannot answer yet (``None`` once a model is loaded)."""
        if self._current is not None:
            return None
        reason = "no snapshot loaded yet"
        if self.store_up is False:
            reason += "; the snapshot store is unreachable"
        if self.last_error:
            reason += f": {self.last_error}"
        return reason


@dataclass(eq=False)
class SnapshotWatcher:
    """Keeps a :class:`ModelHolder` on the store's current snapshot, in a daemon thread.

    Args:
        store: a ``oclust.training_worker.store.SnapshotStore`` (Redis or directory).
        holder: where loaded models go.
        device: torch device for models the compiled kernel does not run (MLPs run on the CPU).
        torch_threads: inference threads, set when a model is loaded: torch's intra-op
            threads, or the compiled kernel's BLAS threads for MLP snapshots (no torch there).
        poll_interval: longest wait for a change notice before re-reading the pointer (and the
            longest :meth:`stop` waits for the thread).
        retry_interval: first pause after a failed attempt; it doubles with every further
            failure in a row, up to ``max_retry_interval``.
        max_retry_interval: the longest pause between failed attempts.

    Nothing the store holds stops the thread or makes it spin: an unreachable store, a garbled
    pointer or a corrupt snapshot each back off exponentially, are logged once per distinct
    error, and leave the last good model serving. A snapshot that fails verification is
    recorded in ``holder.last_error`` and skipped until the pointer moves again. A watcher with
    nothing to serve yet falls back to the newest stored version that loads; whenever the served
    model is not the pointed one (that one was rejected, the pointer is garbled or missing),
    ``holder.fallback`` says so. A served snapshot is known by its version and its weights'
    sha256, and a pointer that disappears (a store reset) is forgotten, so a new snapshot that
    reuses an old version number is loaded.

    Example:
        >>> import tempfile
        >>> from oclust.training_worker.store import open_store
        >>> holder = ModelHolder()
        >>> watcher = SnapshotWatcher(open_store("file://" + tempfile.mkdtemp()), holder)
        >>> watcher.check(), holder.store_up, holder.current
        (False, True, None)
    """

    store: SnapshotStore
    holder: ModelHolder
    device: str = "cpu"
    poll_interval: float = 1.0
    retry_interval: float = 2.0
    max_retry_interval: float = 30.0
    torch_threads: int | None = None
    failures: int = field(default=0, init=False)  # failed attempts in a row (drives the back-off)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _attempted: int | None = field(default=None, init=False)  # last pointed version tried
    _on_pointer: bool = field(default=False, init=False)  # ... and it is the one served
    _logged: str | None = field(default=None, init=False)  # each distinct error is logged once

    @classmethod
    def for_settings(
        cls, store: SnapshotStore, holder: ModelHolder, settings: ServiceSettings
    ) -> SnapshotWatcher:
        """The watcher ``oclust serve`` (and ``oclust up``) runs for these service settings."""
        return cls(
            store, holder, device=settings.device, poll_interval=settings.poll_interval,
            retry_interval=settings.retry_interval,
            max_retry_interval=settings.max_retry_interval, torch_threads=settings.torch_threads,
        )

    def __post_init__(self) -> None:
        self.max_retry_interval = max(self.max_retry_interval, self.retry_interval)

    def check(self, wait: float = 0.0) -> bool:
        """Wait up to ``wait`` seconds for a new version and swap it in; True if swapped.

        Never raises: store problems set ``holder.store_up = False`` and ``holder.last_error``.
        """
        try:
            pointed = self.store.wait_for_change(self._attempted, timeout=wait)
        except CorruptPointer as exc:  # the store answers, but with garbage
            self.holder.store_up = True
            return self._failed(str(exc), None)
        except StoreError as exc:
            self.holder.store_up = False
            return self._failed(f"snapshot store unavailable: {exc}", None, fall_back=False)
        except Exception as exc:  # never let the thread die or spin on something unforeseen
            return self._failed(f"reading the store failed: {exc!r}", None)
        self.holder.store_up = True
        if pointed is None:
            self._attempted = None  # a reset store numbers its snapshots from 1 again
        if pointed is None or pointed == self._attempted:
            if pointed is not None and self.holder.current is None:
                # the pointed version was rejected and no fallback served yet: try again,
                # backing off, so a failed listing or a store blip is not final
                why = self.holder.last_error or f"snapshot {pointed} rejected"
                if self._fall_back(pointed, why):
                    return True
                self.failures += 1
                return False
            self.failures = 0
            if pointed is None:
                why = "the store has no current-version pointer"
                if self.holder.current is None:
                    self.holder.last_error = "no snapshot published yet in the store"
                    return self._fall_back(None, why)
                self._not_pointed(None, why)
            elif self._on_pointer:  # the store answers again, and the served version is pointed
                self._on_pointed()
            return False
        try:
            model = self._load(pointed)
        except StoreError as exc:
            if not isinstance(exc, VersionNotFound):
                self.holder.store_up = False
                message = f"snapshot store unavailable: {exc}"
                self._not_pointed(pointed, message)  # retried, not skipped: no _attempted
                return self._failed(message, None, fall_back=False)
            return self._failed(f"snapshot {pointed} rejected: {exc}", pointed)
        except Exception as exc:  # SnapshotError, or a manifest the model code cannot rebuild
            return self._failed(f"snapshot {pointed} rejected: {exc}", pointed)
        self._attempted, self._on_pointer = pointed, True
        served = self.holder.current
        if served is not None and (served.version, served.sha256) == (model.version,
                                                                       model.sha256):
            self._on_pointed()  # the pointer came back to the served snapshot: no swap
            return False
        self._serve(model, None)
        return True

    def _on_pointed(self) -> None:
        """The served model is the pointed one: clear what earlier failures reported."""
        self.failures = 0
        self._logged = None
        self.holder.fallback = None
        self.holder.last_error = None

    def _not_pointed(self, pointed: int | None, why: str) -> None:
        """Say in ``holder.fallback`` that the served model (if any) is not the pointed one."""
        served = self.holder.current
        if served is not None:
            target = "the pointer" if pointed is None else f"pointed version {pointed}"
            self.holder.fallback = (f"fallback: {target} cannot be loaded ({why}); serving "
                                    f"version {served.version} (sha256 {served.sha256[:12]})")

    def _load(self, version: int) -> LoadedModel:
        # the store verifies the checksums as it reads; the snapshot is not verified again
        return LoadedModel.from_snapshot(self.store.load(version), self.device, verify=False,
                                         torch_threads=self.torch_threads)

    def _serve(self, model: LoadedModel, fallback: str | None) -> None:
        self.holder.swap(model, fallback=fallback)
        self.failures = 0
        if fallback is None:
            self._logged = None
        note = f" ({fallback})" if fallback else ""
        log.info("serving snapshot version %d (sha256 %s)%s", model.version, model.sha256[:12],
                 note)

    def _failed(self, message: str, pointed: int | None, fall_back: bool = True) -> bool:
        """Record a failed attempt; with nothing served yet, try the newest valid version."""
        if pointed is not None:
            self._attempted = pointed  # skipped until the pointer moves again
            self._on_pointer = False
        if fall_back:  # a store that does not answer names no pointer
            self._not_pointed(pointed, message)
        self.holder.last_error = message
        self.failures += 1
        if message != self._logged:
            self._logged = message
            serving = getattr(self.holder.current, "version", None)
            log.error("%s; still serving version %s", message, serving)
        if not fall_back or self.holder.current is not None:
            return False
        return self._fall_back(pointed, message)

    def _fall_back(self, pointed: int | None, why: str) -> bool:
        """Serve the newest stored version (other than ``pointed``) that loads; True if one did."""
        try:
            versions = self.store.versions()
        except Exception:  # the next attempt (after the back-off) tries again
            return False
        for version in reversed(versions):
            if version == pointed:
                continue
            try:
                model = self._load(version)
            except StoreError as exc:
                if not isinstance(exc, VersionNotFound):  # the store failed, not the version:
                    return False  # the next attempt starts again from the newest
                continue
            except Exception:
                continue
            target = "the pointer" if pointed is None else f"pointed version {pointed}"
            self._serve(model, f"fallback: {target} cannot be loaded ({why}); serving the newest "
                               f"valid version {version}")
            self.holder.last_error = why
            return True
        return False

    def backoff(self) -> float:
        """Seconds to pause before the next attempt: 0 after a success, else exponential."""
        if self.failures == 0:
            return 0.0
        doublings = min(self.failures - 1, 32)  # 2.0 ** 1024 would overflow a float
        return min(self.retry_interval * 2.0**doublings, self.max_retry_interval)

    def start(self) -> None:
        """Start the background thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="oclust-snapshot-watcher", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to finish and wait for it (at most ``timeout`` seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.poll_interval + 1.0 if timeout is None else timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check(wait=self.poll_interval)
                pause = self.backoff()
            except Exception:  # check never raises; should it, the watcher still never stops
                log.exception("snapshot watcher: unexpected error; retrying")
                pause = self.max_retry_interval
            if pause:
                self._stop.wait(pause)
