"""One active trainer per namespace (ARCHITECTURE.md §3): a lease, renewed while training.

* Redis: redis-py's :class:`~redis.lock.Lock` on ``NS:lease`` with the owner as its token
  (``SET NX PX ttl``); the holder extends it (only while the token is still its own) and
  releases it on exit (same check). A standby retries until the key lapses.
* Directory store: an exclusive ``flock`` on ``DIR/NS/lease.lock``; the kernel releases it
  when the process dies, so there is nothing to renew.

Example:
    >>> import tempfile
    >>> from oclust.training_worker.store import DirectoryStore
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
import json
import os
import socket
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any

from redis.exceptions import RedisError

from oclust.training_worker.store import DirectoryStore, RedisStore, SnapshotStore, StoreError

__all__ = [
    "FileLease", "Lease", "ProgressLog", "RedisLease", "default_owner", "make_lease",
    "make_progress_log",
]

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


class ProgressLog:
    """What the active worker has in hand, and how often each suspect crashed, in the store.

    The active worker marks, per partition, the offsets it holds but no snapshot covers yet
    (``mark``) and clears the mark on a clean stop. A mark found at start-up means the previous
    holder of the lease died there; ``bump`` counts such deaths per suspect key and
    ``forget_below`` drops the counts a published snapshot has moved past. Redis: ``NS:inflight``
    (JSON) and the hash ``NS:attempts``; directory store: ``inflight.json`` and
    ``attempts.json`` next to the lease file.

    Example:
        >>> import tempfile
        >>> from oclust.training_worker.store import DirectoryStore
        >>> log = make_progress_log(DirectoryStore(tempfile.mkdtemp(), "demo"))
        >>> log.mark({"t:0": (10, 20)}); log.read()
        {'t:0': (10, 20)}
        >>> log.bump("msg:t:0:12"), log.bump("msg:t:0:12")
        (1, 2)
        >>> log.forget_below("t:0", 13); log.bump("msg:t:0:12")
        1
        >>> log.clear(); log.read()
        {}
    """

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        if isinstance(store, RedisStore):
            self._inflight_key, self._attempts_key = store.key("inflight"), store.key("attempts")
        elif isinstance(store, DirectoryStore):
            self._inflight = store.path / "inflight.json"
            self._attempts = store.path / "attempts.json"
        else:
            raise StoreError(f"no progress log for {type(store).__name__}")

    # -- helpers over the two backends
    def _get(self, which: str) -> dict[str, Any]:
        """The mark or the counts; garbage in either reads as empty (it proves nothing)."""
        try:
            if isinstance(self.store, RedisStore):
                if which == "inflight":
                    raw: Any = self.store.client.get(self._inflight_key)
                else:
                    raw = self.store.client.hgetall(self._attempts_key)
                    return {k.decode(errors="replace"): int(v) for k, v in raw.items()
                            if v.isdigit()}
            else:
                path = self._inflight if which == "inflight" else self._attempts
                raw = path.read_bytes() if path.exists() else None
        except (RedisError, OSError) as exc:
            raise StoreError(f"cannot read the worker's progress log: {exc}") from exc
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _put_file(self, path: Path, data: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    # -- the API
    def mark(self, ranges: dict[str, tuple[int, int]]) -> None:
        """Record ``{"topic:partition": (lo, hi)}``: offsets ``lo..hi-1`` are in hand."""
        data = {k: list(v) for k, v in ranges.items()}
        try:
            if isinstance(self.store, RedisStore):
                self.store.client.set(self._inflight_key, json.dumps(data))
            else:
                self._put_file(self._inflight, data)
        except (RedisError, OSError) as exc:
            raise StoreError(f"cannot write the worker's progress log: {exc}") from exc

    def read(self) -> dict[str, tuple[int, int]]:
        """The mark left by the last holder (empty after a clean stop)."""
        try:
            return {str(k): (int(v[0]), int(v[1])) for k, v in self._get("inflight").items()}
        except (TypeError, IndexError, ValueError, AttributeError):
            return {}  # a garbled mark is no evidence of anything

    def clear(self) -> None:
        """Forget the mark (a clean stop: nothing in hand)."""
        try:
            if isinstance(self.store, RedisStore):
                self.store.client.delete(self._inflight_key)
            else:
                self._inflight.unlink(missing_ok=True)
        except (RedisError, OSError) as exc:
            raise StoreError(f"cannot clear the worker's progress log: {exc}") from exc

    def bump(self, key: str) -> int:
        """Count one more crash on ``key`` (``range:T:P:LO`` or ``msg:T:P:OFFSET``)."""
        try:
            if isinstance(self.store, RedisStore):
                return int(self.store.client.hincrby(self._attempts_key, key, 1))
        except RedisError as exc:
            raise StoreError(f"cannot count an attempt: {exc}") from exc
        counts = self._get("attempts")
        previous = counts.get(key, 0)
        counts[key] = (previous if isinstance(previous, int) else 0) + 1
        self._put_file(self._attempts, counts)
        return counts[key]

    def forget_below(self, partition_key: str, offset: int) -> None:
        """Drop the counts of ``partition_key`` ("topic:partition") below ``offset``."""
        counts = self._get("attempts")
        stale = [k for k in counts
                 if k.partition(":")[2].rpartition(":")[0] == partition_key
                 and k.rpartition(":")[2].isdigit() and int(k.rpartition(":")[2]) < offset]
        if not stale:
            return
        try:
            if isinstance(self.store, RedisStore):
                self.store.client.hdel(self._attempts_key, *stale)
            else:
                self._put_file(self._attempts, {k: v for k, v in counts.items()
                                                if k not in stale})
        except (RedisError, OSError) as exc:
            raise StoreError(f"cannot prune the attempt counts: {exc}") from exc


def make_progress_log(store: SnapshotStore) -> ProgressLog:
    """The :class:`ProgressLog` of ``store``'s namespace."""
    return ProgressLog(store)
