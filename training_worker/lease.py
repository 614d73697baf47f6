"""One active trainer per namespace (ARCHITECTURE.md §3): a lease, renewed while training.

* Redis: redis-py's :class:`~redis.lock.Lock` on ``NS:lease`` with the owner as its token
  (``SET NX PX ttl``); the holder extends it (only while the token is still its own) and
  releases it on exit (same check). A standby retries until the key lapses.
* Directory store: an exclusive ``flock`` on ``DIR/NS/lease.lock``; the kernel releases it
  when the process dies, so there is nothing to renew.

Example:
    >>> import tempfile
    >>> from training_worker.store import DirectoryStore
    >>> store = DirectoryStore(tempfile.mkdtemp(), "demo")
    >>> a, b = make_lease(store, "a"), make_lease(store, "b")
    >>> a.try_acquire(), b.try_acquire(), a.renew()
    (True, False, True)
    >>> a.release(); b.try_acquire()
    True
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import uuid
from abc import ABC, abstractmethod
from typing import IO

from redis.exceptions import RedisError

from training_worker.store import DirectoryStore, RedisStore, SnapshotStore, StoreError

__all__ = ["FileLease", "Lease", "RedisLease", "default_owner", "make_lease"]

def default_owner() -> str:
    """``host:pid:random``: tells workers apart, even two in one process."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease(ABC):
    """A lease held by ``owner``; ``ttl`` seconds before an unrenewed lease lapses."""

    owner: str
    ttl: float

    @abstractmethod
    def try_acquire(self) -> bool:
        """Take the lease if it is free (or already ours); never blocks."""

    @abstractmethod
    def renew(self) -> bool:
        """Extend the lease; False when it is no longer ours."""

    @abstractmethod
    def release(self) -> None:
        """Give the lease up (only if it is ours)."""

    @abstractmethod
    def holder(self) -> str | None:
        """Who holds it now (``None`` when free or unknown)."""


class RedisLease(Lease):
    """``NS:lease`` in the store's Redis: a redis-py ``Lock`` whose token is the owner."""

    def __init__(self, store: RedisStore, owner: str, ttl: float = 10.0) -> None:
        self.store = store
        self.owner = owner
        self.ttl = ttl
        self.key = store.key("lease")
        # not thread-local: the worker takes, renews and releases it from different threads
        self._lock = store.client.lock(self.key, timeout=ttl, thread_local=False)

    def try_acquire(self) -> bool:
        try:
            if self._lock.acquire(blocking=False, token=self.owner):
                return True
        except RedisError as exc:
            raise StoreError(
                f"cannot take the lease {self.key} at {self.store.url}: {exc}"
            ) from exc
        return self.renew()  # already ours: extended; someone else's: False

    def renew(self) -> bool:
        try:
            return bool(self._lock.extend(self.ttl, replace_ttl=True))
        except RedisError:  # not ours (LockError), or cannot prove we still hold it
            return False

    def release(self) -> None:
        with contextlib.suppress(RedisError):  # LockError: it was not ours
            self._lock.release()

    def holder(self) -> str | None:
        try:
            raw = self.store.client.get(self.key)
        except RedisError:
            return None
        return None if raw is None else raw.decode(errors="replace")


class FileLease(Lease):
    """An exclusive, non-blocking ``flock`` on ``DIR/NS/lease.lock``."""

    def __init__(self, store: DirectoryStore, owner: str, ttl: float = 10.0) -> None:
        self.store = store
        self.owner = owner
        self.ttl = ttl
        self.path = store.path / "lease.lock"
        self._fh: IO[str] | None = None

    def try_acquire(self) -> bool:
        if self._fh is not None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+")  # noqa: SIM115 - held open while the lease is ours
        except OSError as exc:
            raise StoreError(f"cannot open lease file {self.path}: {exc}") from exc
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        fh.seek(0)
        fh.truncate()
        fh.write(self.owner)
        fh.flush()
        self._fh = fh
        return True

    def renew(self) -> bool:
        return self._fh is not None

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def holder(self) -> str | None:
        try:
            return self.path.read_text() or None
        except OSError:
            return None


def make_lease(store: SnapshotStore, owner: str | None = None, ttl: float = 10.0) -> Lease:
    """The lease that fits ``store`` (Redis key or lock file)."""
    owner = owner or default_owner()
    if isinstance(store, RedisStore):
        return RedisLease(store, owner, ttl)
    if isinstance(store, DirectoryStore):
        return FileLease(store, owner, ttl)
    raise StoreError(f"no lease implementation for {type(store).__name__}")
