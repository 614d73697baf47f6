"""The snapshot-store contract shared by every store, and its errors.

:class:`SnapshotStore` states the semantics (publish, load verified, rollback, wait for a
change); :mod:`oclust.training_worker.store.redis_store` and
:mod:`oclust.training_worker.store.directory` implement them.

Example:
    >>> _pointer(b"12", "here")
    12
    >>> try:
    ...     _pointer(b"garbage", "here")
    ... except CorruptPointer as exc:
    ...     print(type(exc).__name__, isinstance(exc, StoreError))
    CorruptPointer True
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

from oclust.model.snapshot import Snapshot, SnapshotError

__all__ = [
    "DEFAULT_KEEP",
    "CorruptPointer",
    "LeaseLost",
    "SnapshotError",
    "SnapshotStore",
    "StoreError",
    "VersionNotFound",
    "check_namespace",
]

DEFAULT_KEEP = 5
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class StoreError(RuntimeError):
    """The store cannot be reached, is misconfigured, or lacks what was asked for."""


class VersionNotFound(StoreError, LookupError):
    """The requested snapshot version (or any current version) does not exist."""


class LeaseLost(StoreError):
    """A publish fenced by a lease owner found the lease held by another (or by none)."""


class CorruptPointer(StoreError):
    """The current-version pointer holds something other than a version number.

    ``oclust snapshots rollback V`` (or the next publish) overwrites it.
    """


def _pointer(raw: bytes | str, where: str) -> int:
    """Parse a stored current-version pointer; :class:`CorruptPointer` unless it is a version."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    if text.strip().isascii() and text.strip().isdigit() and len(text) < 20:  # not '²'
        return int(text)
    raise CorruptPointer(
        f"the current-version pointer {where} holds {text[:40]!r}, not a version number "
        "(repair it with `oclust snapshots rollback VERSION`)"
    )


def check_namespace(namespace: str) -> str:
    """``namespace`` if a store can use it as a key prefix and a directory name."""
    if not _NAMESPACE_RE.match(namespace or ""):
        raise StoreError(
            f"namespace must be 1-64 characters of letters, digits, '_', '-' or '.', "
            f"got {namespace!r}"
        )
    return namespace


def _check_keep(keep: int | None) -> int | None:
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise StoreError(f"keep must be a positive integer (or None for all), got {keep!r}")
    return keep


class SnapshotStore(ABC):
    """What every snapshot store offers; see the module docstring for the semantics."""

    namespace: str
    keep: int | None

    def __init__(self, namespace: str, keep: int | None, poll_interval: float) -> None:
        """Check and set what every store has: its namespace, the versions to keep and the
        seconds between polls in :meth:`wait_for_change`."""
        self.namespace = check_namespace(namespace)
        self.keep = _check_keep(keep)
        self.poll_interval = poll_interval

    @abstractmethod
    def publish(self, snapshot: Snapshot, owner: str | None = None) -> int:
        """Store ``snapshot`` as the next version, make it current, announce it; return it.

        ``owner``: publish only while the namespace's lease is this owner's, checked in the
        same atomic step as the write (:class:`LeaseLost` otherwise), so a worker paused past
        its lease between renewing it and publishing cannot overwrite its successor's
        snapshots. A directory store ignores it: its lease is an ``flock`` the holder keeps for
        as long as it lives.
        """

    @abstractmethod
    def current_version(self) -> int | None:
        """The current version, or ``None`` when nothing was published yet."""

    @abstractmethod
    def versions(self) -> list[int]:
        """Stored versions, ascending."""

    @abstractmethod
    def _read(self, version: int) -> tuple[bytes, bytes]:
        """Weights and manifest bytes of ``version``; :class:`VersionNotFound` if absent."""

    @abstractmethod
    def rollback(self, version: int) -> None:
        """Make a stored ``version`` current and announce it."""

    @abstractmethod
    def wait_for_change(self, known: int | None, timeout: float) -> int | None:
        """Block until the current version differs from ``known`` or ``timeout`` seconds pass."""

    @abstractmethod
    def ping(self) -> bool:
        """True when the store answers."""

    @abstractmethod
    def close(self) -> None:
        """Release connections or file handles."""

    @property
    @abstractmethod
    def url(self) -> str:
        """Where the store lives (for logs; never includes a password)."""

    def load(self, version: int | None = None) -> Snapshot:
        """The snapshot ``version`` (default: current), with its sha256 verified.

        Raises :class:`VersionNotFound` when it is missing and :class:`SnapshotError` when the
        stored bytes are corrupt.
        """
        if version is None:
            version = self.current_version()
            if version is None:
                raise VersionNotFound(
                    f"no snapshot published yet in namespace {self.namespace!r} at {self.url}"
                )
        weights, manifest = self._read(int(version))
        snap = Snapshot.from_parts(weights, manifest)
        snap.verify()
        if snap.version != int(version):
            raise SnapshotError(
                f"stored manifest {version} says it is version {snap.version}: store is corrupt"
            )
        return snap

    def _to_prune(self, versions: list[int], current: int | None) -> list[int]:
        if self.keep is None:
            return []
        kept = set(sorted(versions)[-self.keep :])
        return [v for v in versions if v not in kept and v != current]

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
