"""Snapshots in Redis (the deployment store).

Layout (other tools rely on it): ``NS:weights:{v}`` safetensors bytes, ``NS:manifest:{v}``
JSON, ``NS:current`` the current version as a decimal integer, ``NS:versions`` a sorted set of
stored versions, ``NS:seq`` the last version handed out, and notices ``{"version": v}`` on the
pub/sub channel ``NS:events`` (a rollback adds ``"rollback": true``). Pub/sub is at-most-once,
so :meth:`RedisStore.wait_for_change` also polls ``NS:current``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import redis
from redis.exceptions import RedisError

from oclust.model.snapshot import Snapshot
from oclust.training_worker.store.base import (
    DEFAULT_KEEP,
    LeaseLost,
    SnapshotStore,
    StoreError,
    VersionNotFound,
    _pointer,
)

__all__ = ["RedisStore"]

_ALLOCATE = """
local seq = tonumber(redis.call('INCR', KEYS[1]))
local top = redis.call('ZREVRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if top[2] ~= nil and seq <= tonumber(top[2]) then
  seq = tonumber(top[2]) + 1
  redis.call('SET', KEYS[1], seq)
end
return seq
"""

# KEYS: lease, weights:v, manifest:v, versions, current, events;
# ARGV: owner ('' for no fence), version, weights, manifest, notice
_PUBLISH = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[2])
redis.call('SET', KEYS[5], ARGV[2])
redis.call('PUBLISH', KEYS[6], ARGV[5])
return 1
"""

# KEYS: current, versions; ARGV: prefix, keep
_PRUNE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
local keep = tonumber(ARGV[2])
local all = redis.call('ZRANGE', KEYS[2], 0, -1)
local removed = {}
for i = 1, #all - keep do
  local v = tonumber(all[i])
  if v ~= current then
    redis.call('DEL', ARGV[1] .. 'weights:' .. all[i], ARGV[1] .. 'manifest:' .. all[i])
    redis.call('ZREM', KEYS[2], all[i])
    removed[#removed + 1] = v
  end
end
return removed
"""

# KEYS: current, weights:v, manifest:v, events; ARGV: version, notice
_ROLLBACK = """
if redis.call('EXISTS', KEYS[2]) == 0 or redis.call('EXISTS', KEYS[3]) == 0 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[4], ARGV[2])
return 1
"""


class RedisStore(SnapshotStore):
    """Snapshots in Redis under ``NS:*`` keys (layout in the module docstring).

    Args:
        url: ``redis://[user:password@]host:port/db`` (or ``rediss://``, ``unix://``).
        namespace: key prefix, e.g. ``oclust``.
        keep: versions to keep (``None`` keeps all); the current one is never pruned.
        poll_interval: seconds between polls of ``NS:current`` in :meth:`wait_for_change`.
        socket_timeout: seconds before a Redis command gives up.

    Example:
        >>> store = RedisStore("redis://127.0.0.1:1/0", namespace="demo")  # connects lazily
        >>> store.ping()
        False
    """

    def __init__(
        self,
        url: str,
        namespace: str = "oclust",
        keep: int | None = DEFAULT_KEEP,
        poll_interval: float = 1.0,
        socket_timeout: float = 10.0,
    ) -> None:
        super().__init__(namespace, keep, poll_interval)
        self._url = url
        try:
            self.client = redis.Redis.from_url(
                url, socket_timeout=socket_timeout, socket_connect_timeout=min(socket_timeout, 5)
            )
        except ValueError as exc:
            raise StoreError(f"bad Redis URL {self.url}: {exc}") from None
        self._allocate = self.client.register_script(_ALLOCATE)
        self._publish = self.client.register_script(_PUBLISH)
        self._prune = self.client.register_script(_PRUNE)
        self._rollback = self.client.register_script(_ROLLBACK)

    @property
    def url(self) -> str:
        parsed = urlparse(self._url)
        host = parsed.netloc.rpartition("@")[2]  # never the password; a bad port as written
        return f"{parsed.scheme}://{host}{parsed.path}"

    def key(self, *parts: object) -> str:
        """``NS:part1:part2``."""
        return ":".join([self.namespace, *map(str, parts)])

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except RedisError as exc:
            raise StoreError(f"Redis at {self.url} failed while {doing}: {exc}") from exc

    def publish(self, snapshot: Snapshot, owner: str | None = None) -> int:
        k = self.key
        with self._errors("publishing a snapshot"):
            version = int(self._allocate(keys=[k("seq"), k("versions")]))
            snap = snapshot.with_version(version)
            notice = json.dumps({"version": version})
            done = self._publish(  # one atomic script: the lease check, then every write
                keys=[k("lease"), k("weights", version), k("manifest", version), k("versions"),
                      k("current"), k("events")],
                args=[owner or "", version, snap.weights, snap.manifest_json(), notice],
            )
            if not done:
                raise LeaseLost(
                    f"the lease {k('lease')} at {self.url} is no longer {owner!r}'s "
                    f"(held by {self._holder()!r}): snapshot not published"
                )
            if self.keep is not None:
                self._prune(keys=[k("current"), k("versions")], args=[k(""), self.keep])
        return version

    def _holder(self) -> str | None:
        with contextlib.suppress(RedisError):
            raw = self.client.get(self.key("lease"))
            return None if raw is None else raw.decode(errors="replace")
        return None

    def current_version(self) -> int | None:
        with self._errors("reading the current version"):
            raw = self.client.get(self.key("current"))
        return None if raw is None else _pointer(raw, f"{self.key('current')} at {self.url}")

    def versions(self) -> list[int]:
        with self._errors("listing versions"):
            raw = self.client.zrange(self.key("versions"), 0, -1)
        return sorted(int(v) for v in raw if v.isdigit())  # foreign members are ignored

    def _read(self, version: int) -> tuple[bytes, bytes]:
        with self._errors(f"loading version {version}"):
            weights, manifest = self.client.mget(
                self.key("weights", version), self.key("manifest", version)
            )
        if weights is None or manifest is None:
            raise VersionNotFound(
                f"snapshot version {version} is not stored in namespace {self.namespace!r} "
                f"at {self.url} (stored: {self.versions()})"
            )
        return weights, manifest

    def rollback(self, version: int) -> None:
        k = self.key
        notice = json.dumps({"version": int(version), "rollback": True})
        with self._errors(f"rolling back to version {version}"):
            done = self._rollback(
                keys=[k("current"), k("weights", version), k("manifest", version), k("events")],
                args=[int(version), notice],
            )
        if not done:
            raise VersionNotFound(
                f"cannot roll back to version {version}: not stored in namespace "
                f"{self.namespace!r} (stored: {self.versions()})"
            )

    def wait_for_change(self, known: int | None, timeout: float) -> int | None:
        """Block on ``NS:events`` (polling ``NS:current`` too) until current != ``known``."""
        deadline = time.monotonic() + max(0.0, timeout)
        pubsub = None
        try:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(self.key("events"))
        except RedisError:
            pubsub = None  # pub/sub unavailable: polling alone still works
        try:
            while True:
                current = self.current_version()  # after subscribing: no notice can slip by
                remaining = deadline - time.monotonic()
                if current != known or remaining <= 0:
                    return current
                wait = min(self.poll_interval, remaining)
                if pubsub is None:
                    time.sleep(wait)
                    continue
                try:
                    pubsub.get_message(timeout=wait)
                except RedisError:
                    pubsub = None
        finally:
            if pubsub is not None:
                with contextlib.suppress(RedisError):
                    pubsub.close()

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except RedisError:
            return False

    def close(self) -> None:
        self.client.close()
