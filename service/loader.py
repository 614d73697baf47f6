"""Loaded models, the holder the HTTP app reads, and the watcher that hot-reloads snapshots.

* :class:`LoadedModel` — an immutable, ready-to-serve model built from a verified snapshot:
  the encoder in eval mode, the serving centroids, the manifest (and its JSON, pre-rendered).
* :class:`ModelHolder` — one reference to the current :class:`LoadedModel`. A swap is a single
  attribute assignment, so a request that read ``holder.current`` once uses exactly one model
  from start to end: no request ever sees half a model.
* :class:`SnapshotWatcher` — a background thread that loads the store's current version at start
  and then waits for changes (``NS:events`` pub/sub with polling, via
  ``SnapshotStore.wait_for_change``), verifies each snapshot's checksums (weights and manifest)
  and swaps it in. While the store is unreachable or holds garbage it keeps the last good model,
  backs off exponentially and reports ``store_up = False`` (unreachable) or ``last_error``.

Only the watcher talks to the store; the HTTP app needs just this module's holder and ``model``.
``training_worker.store`` is imported lazily, inside the watcher.

Example:
    >>> import numpy as np
    >>> from model import OnlineClusterer
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
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from model import OnlineClusterer, Snapshot
from model.regularisers import serve, sq_distances
from service.fastpath import SingleAssign, compile_single

if TYPE_CHECKING:
    from training_worker.store import SnapshotStore

__all__ = ["Assignment", "LoadedModel", "ModelHolder", "NearestCentroid", "SnapshotWatcher"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Assignment:
    """Served answers for a batch (nearest centroid, or the method's own rule)."""

    labels: np.ndarray  # int64 (N,)
    distances: np.ndarray  # float64 (N,), squared distance to the chosen centroid
    soft: np.ndarray  # float32 (N, K), softmax of the served logits, for the soft metrics


class _Pipeline(nn.Module):
    """scaler -> encoder -> squared distances -> the served rule (``model.regularisers.serve``)
    -> (labels, distances, soft assignments)."""

    def __init__(
        self,
        scaler: nn.Module | None,
        encoder: nn.Module,
        centroids: torch.Tensor,
        sigma: float,
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.scaler = scaler if scaler is not None else nn.Identity()
        self.encoder = encoder
        self.head = head
        self.register_buffer("centroids", centroids)
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder(self.scaler(x))
        labels, dist, logits = serve(z, sq_distances(z, self.centroids), self.sigma, self.head)
        return labels, dist, torch.softmax(logits, dim=1)


class NearestCentroid:
    """The inference path of a fitted :class:`OnlineClusterer`, prepared once for serving.

    One forward pass gives the hard label, its squared distance and the soft assignment row
    (what ``clf.assign`` and ``clf.soft_assign`` return, without running the encoder twice or
    re-validating input the service has already validated).

    Single samples, the latency-critical case, take the fastest path that reproduces the torch
    pipeline on random probes (``single_path``): ``"compiled"`` (MLP encoders lowered to one
    numba kernel, see :mod:`service.fastpath`; nearest-centroid methods only), else ``"traced"``
    (TorchScript-traced and frozen; also CM/AE-CM, whose argmax-gamma head it applies), else
    ``"eager"``. Batches always run in torch.

    Example:
        >>> import numpy as np
        >>> from model import OnlineClusterer
        >>> clf = OnlineClusterer(n_clusters=2, latent_dim=4, seed=0, device="cpu")
        >>> _ = clf.partial_fit(np.random.default_rng(0).normal(size=(64, 3)).astype("float32"))
        >>> nc = NearestCentroid.from_clusterer(clf)
        >>> nc(np.zeros((2, 3), "float32")).soft.shape, nc.single_path
        ((2, 2), 'compiled')
    """

    def __init__(
        self,
        pipeline: nn.Module,
        device: torch.device,
        single: SingleAssign | None = None,
        single_path: str = "eager",
    ) -> None:
        self.pipeline = pipeline
        self.device = device
        self.single = single
        self.single_path = single_path if single is not None else "eager"

    @classmethod
    def from_clusterer(cls, clf: OnlineClusterer, fast: bool = True) -> NearestCentroid:
        """Freeze a fitted clusterer's encoder (eval mode) and serving centroids."""
        if not clf.is_fitted:
            raise ValueError("the clusterer is not fitted")
        clf.encoder_.eval()
        with torch.no_grad():  # a normal tensor, usable inside and outside inference mode
            centroids = clf.reg_.serving_centroids(clf.centroids_).detach().clone()
        scaler = clf.scaler_ if clf.standardize else None
        head = clf.reg_.serving_head()
        pipeline = _Pipeline(scaler, clf.encoder_, centroids, float(clf.sigma), head).eval()
        if not fast:
            return cls(pipeline, clf.device_)
        shape = tuple(clf.input_shape_)
        # the compiled kernel knows only the nearest-centroid rule: a method with its own
        # (CM/AE-CM's argmax gamma) takes the traced pipeline, which applies it
        single = None if head is not None else compile_single(
            pipeline.scaler, pipeline.encoder, centroids, float(clf.sigma), shape, pipeline
        )
        if single is not None:
            return cls(pipeline, clf.device_, single, "compiled")
        traced = _trace(pipeline, shape, clf.device_)
        return cls(pipeline, clf.device_, traced, "traced")

    def __call__(self, batch: np.ndarray) -> Assignment:
        """Assign a validated float32 batch of shape (N, *input_shape)."""
        if self.single is not None and len(batch) == 1:
            labels, dist, soft = self.single(batch)
            return Assignment(labels, dist.astype(np.float64), soft)
        x = torch.from_numpy(batch)
        if self.device.type != "cpu":
            x = x.to(self.device)
        with torch.inference_mode():
            labels, dist, soft = self.pipeline(x)
        return Assignment(
            labels.cpu().numpy(), dist.cpu().numpy().astype(np.float64), soft.cpu().numpy()
        )


def _trace(
    pipeline: nn.Module, input_shape: tuple[int, ...], device: torch.device
) -> SingleAssign | None:
    """Traced + frozen single-sample pipeline, or ``None`` if it does not match eager mode."""
    gen = torch.Generator().manual_seed(0)
    probes = [torch.randn((1, *input_shape), generator=gen).to(device) * s for s in (0.5, 2, 8)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarning: branches baked in, as intended
            with torch.inference_mode():
                traced = torch.jit.freeze(
                    torch.jit.trace(pipeline, probes[0], check_trace=False).eval()
                )
                for probe in probes * 2:  # also warms the executor up
                    want, got = pipeline(probe), traced(probe)
                    if not (
                        torch.equal(want[0], got[0])
                        and torch.allclose(want[1], got[1], rtol=1e-4, atol=1e-5)
                    ):
                        raise ValueError("traced pipeline disagrees with eager mode")
    except Exception as exc:  # tracing is an optimisation: fall back to eager mode
        log.warning("single-sample fast path unavailable, serving eagerly: %s", exc)
        return None

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # frozen graph: weights are constants, nothing requires grad, so no context needed
        labels, dist, soft = traced(torch.from_numpy(batch).to(device))
        return labels.cpu().numpy(), dist.cpu().numpy(), soft.cpu().numpy()

    return run


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
    infer: NearestCentroid

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, device: str = "cpu") -> LoadedModel:
        """Verify the sha256 and rebuild the model; :class:`SnapshotError` if it is bad."""
        snapshot.verify()
        clf = OnlineClusterer.from_snapshot(snapshot, device=device)
        manifest = json.loads(snapshot.manifest_json())  # a private deep copy
        prior = np.asarray(clf.prior_, dtype=np.float64).copy()
        prior.setflags(write=False)
        return cls(
            version=snapshot.version,
            sha256=snapshot.sha256,
            manifest=MappingProxyType(manifest),
            manifest_json=snapshot.manifest_json().encode(),
            n_clusters=int(clf.n_clusters),
            input_shape=tuple(int(s) for s in clf.input_shape_),
            prior=prior,
            created_at=snapshot.meta.created_at,
            loaded_at=time.time(),
            infer=NearestCentroid.from_clusterer(clf),
        )

    @property
    def input_size(self) -> int:
        """Numbers in one sample (the product of ``input_shape``)."""
        return int(np.prod(self.input_shape))

    def assign(self, batch: np.ndarray) -> Assignment:
        """Served cluster of each sample of a validated float32 batch (N, *input_shape)."""
        return self.infer(batch)


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

    @property
    def store_up(self) -> bool | None:
        """Whether the store answered the last attempt (``None``: no store attached yet)."""
        return self._store_up

    @store_up.setter
    def store_up(self, up: bool | None) -> None:
        if up != self._store_up:
            with self._changed:
                self._store_up = up
                self._changed.notify_all()

    @property
    def last_error(self) -> str | None:
        """Why the latest load attempt failed (cleared by a successful swap)."""
        return self._last_error

    @last_error.setter
    def last_error(self, message: str | None) -> None:
        if message != self._last_error:
            with self._changed:
                self._last_error = message
                self._changed.notify_all()

    @property
    def fallback(self) -> str | None:
        """Why the served model is not the pointed version (``None``: it is)."""
        return self._fallback

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


class SnapshotWatcher:
    """Keeps a :class:`ModelHolder` on the store's current snapshot, in a daemon thread.

    Args:
        store: a ``training_worker.store.SnapshotStore`` (Redis or directory).
        holder: where loaded models go.
        device: torch device for the served models.
        poll_interval: longest wait for a change notice before re-reading the pointer (and the
            longest :meth:`stop` waits for the thread).
        retry_interval: first pause after a failed attempt; it doubles with every further
            failure in a row, up to ``max_retry_interval``.
        max_retry_interval: the longest pause between failed attempts.

    Nothing the store holds stops the thread or makes it spin: an unreachable store, a garbled
    pointer or a corrupt snapshot each back off exponentially, are logged once per distinct
    error, and leave the last good model serving. A snapshot that fails verification is
    recorded in ``holder.last_error`` and skipped until the pointer moves again. A watcher with
    nothing to serve yet falls back to the newest stored version that loads, and says so in
    ``holder.fallback``.

    Example:
        >>> import tempfile
        >>> from training_worker.store import open_store
        >>> holder = ModelHolder()
        >>> watcher = SnapshotWatcher(open_store("file://" + tempfile.mkdtemp()), holder)
        >>> watcher.check(), holder.store_up, holder.current
        (False, True, None)
    """

    def __init__(
        self,
        store: SnapshotStore,
        holder: ModelHolder,
        device: str = "cpu",
        poll_interval: float = 1.0,
        retry_interval: float = 2.0,
        max_retry_interval: float = 30.0,
    ) -> None:
        self.store = store
        self.holder = holder
        self.device = device
        self.poll_interval = poll_interval
        self.retry_interval = retry_interval
        self.max_retry_interval = max(max_retry_interval, retry_interval)
        self.failures = 0  # failed attempts in a row (drives the back-off)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._attempted: int | None = None  # last pointed version tried (loaded or rejected)
        self._logged: str | None = None  # last error logged (each distinct one is logged once)

    def check(self, wait: float = 0.0) -> bool:
        """Wait up to ``wait`` seconds for a new version and swap it in; True if swapped.

        Never raises: store problems set ``holder.store_up = False`` and ``holder.last_error``.
        """
        from training_worker.store import CorruptPointer, StoreError, VersionNotFound

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
        if pointed is None or pointed == self._attempted:
            self.failures = 0
            if pointed is None and self.holder.current is None:
                self.holder.last_error = "no snapshot published yet in the store"
                return self._fall_back(None, "the store has no current-version pointer")
            return False
        try:
            model = self._load(pointed)
        except StoreError as exc:
            if not isinstance(exc, VersionNotFound):
                self.holder.store_up = False
                return self._failed(f"snapshot store unavailable: {exc}", None, fall_back=False)
            return self._failed(f"snapshot {pointed} rejected: {exc}", pointed)
        except Exception as exc:  # SnapshotError, or a manifest the model code cannot rebuild
            return self._failed(f"snapshot {pointed} rejected: {exc}", pointed)
        self._attempted = pointed
        self._serve(model, None)
        return True

    def _load(self, version: int) -> LoadedModel:
        return LoadedModel.from_snapshot(self.store.load(version), device=self.device)

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
        return min(self.retry_interval * 2 ** (self.failures - 1), self.max_retry_interval)

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
            self.check(wait=self.poll_interval)
            pause = self.backoff()
            if pause:
                self._stop.wait(pause)
