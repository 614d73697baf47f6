"""Versioned snapshot stores: Redis (deployment) and a local directory (embedded mode).

Both stores have the same semantics (ARCHITECTURE.md §3):

* ``publish(snap)`` gives the snapshot the next version (previous maximum + 1), writes its
  weights and manifest, then moves the *current* pointer to it atomically and announces it;
  old versions beyond ``keep`` are pruned (the current one never is).
* ``load(version=None)`` returns the current (or a given) version, checksum verified.
* ``rollback(v)`` moves the pointer back to a stored version and announces it.
* ``wait_for_change(known, timeout)`` blocks until the pointer differs from ``known``.

Redis layout (other tools rely on it): ``NS:weights:{v}`` safetensors bytes, ``NS:manifest:{v}``
JSON, ``NS:current`` the current version as a decimal integer, ``NS:versions`` a sorted set of
stored versions, ``NS:seq`` the last version handed out, and notices ``{"version": v}`` on the
pub/sub channel ``NS:events`` (a rollback adds ``"rollback": true``). Pub/sub is at-most-once,
so :meth:`RedisStore.wait_for_change` also polls ``NS:current``.

Directory layout: ``DIR/NS/weights-{v}.safetensors``, ``DIR/NS/manifest-{v}.json`` and
``DIR/NS/current``, each written to a temporary file first and moved into place with
``os.replace`` (atomic on POSIX); ``DIR/NS/.lock`` serialises publishers.

Example:
    >>> import tempfile, torch
    >>> from oclust.model.snapshot import Snapshot, pack_tensors
    >>> store = open_store("file://" + tempfile.mkdtemp(), namespace="demo", keep=2)
    >>> snap = Snapshot.create(pack_tensors({"centroids": torch.zeros(2, 3)}), {"n_clusters": 2})
    >>> store.publish(snap), store.publish(snap), store.publish(snap)
    (1, 2, 3)
    >>> store.versions(), store.current_version(), store.load().version
    ([2, 3], 3, 3)
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from oclust.training_worker.store.base import (
    DEFAULT_KEEP,
    CorruptPointer,
    LeaseLost,
    SnapshotError,
    SnapshotStore,
    StoreError,
    VersionNotFound,
)
from oclust.training_worker.store.directory import DirectoryStore
from oclust.training_worker.store.redis_store import RedisStore

__all__ = [
    "DEFAULT_KEEP",
    "CorruptPointer",
    "DirectoryStore",
    "LeaseLost",
    "RedisStore",
    "SnapshotError",
    "SnapshotStore",
    "StoreError",
    "VersionNotFound",
    "open_store",
]


def open_store(
    url: str, namespace: str = "oclust", keep: int | None = DEFAULT_KEEP, **options: float
) -> SnapshotStore:
    """Open the store named by ``url``: ``redis://``/``rediss://``/``unix://`` or ``file://DIR``.

    A bare path is treated as a directory. ``options`` go to the store's constructor (e.g.
    ``poll_interval``). Nothing connects until the first operation.

    Example:
        >>> import tempfile
        >>> type(open_store("file://" + tempfile.mkdtemp())).__name__
        'DirectoryStore'
    """
    if not url:
        raise StoreError("no store given: pass redis://HOST:PORT/DB or file://DIR")
    scheme = urlparse(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(url, namespace=namespace, keep=keep, **options)
    if scheme == "file":
        parsed = urlparse(url)
        path = unquote(parsed.netloc + parsed.path)
        if not path:
            raise StoreError(f"file store URL needs a directory: {url!r}")
        return DirectoryStore(path, namespace=namespace, keep=keep, **options)
    if scheme == "":
        return DirectoryStore(url, namespace=namespace, keep=keep, **options)
    raise StoreError(f"unknown store URL scheme {scheme!r} in {url!r}: use redis:// or file://")
