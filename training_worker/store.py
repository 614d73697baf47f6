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
    >>> from model.snapshot import Snapshot, pack_tensors
    >>> store = open_store("file://" + tempfile.mkdtemp(), namespace="demo", keep=2)
    >>> snap = Snapshot.create(pack_tensors({"centroids": torch.zeros(2, 3)}), {"n_clusters": 2})
    >>> store.publish(snap), store.publish(snap), store.publish(snap)
    (1, 2, 3)
    >>> store.versions(), store.current_version(), store.load().version
    ([2, 3], 3, 3)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import redis
from redis.exceptions import RedisError

from model.snapshot import Snapshot, SnapshotError

__all__ = [
    "CorruptPointer",
    "DirectoryStore",
    "RedisStore",
    "SnapshotError",
    "SnapshotStore",
    "StoreError",
    "VersionNotFound",
    "open_store",
]

DEFAULT_KEEP = 5
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class StoreError(RuntimeError):
    """The store cannot be reached, is misconfigured, or lacks what was asked for."""


class VersionNotFound(StoreError, LookupError):
    """The requested snapshot version (or any current version) does not exist."""


class CorruptPointer(StoreError):
    """The current-version pointer holds something other than a version number.

    ``oclust snapshots rollback V`` (or the next publish) overwrites it.
    """


def _pointer(raw: bytes | str, where: str) -> int:
    """Parse a stored current-version pointer; :class:`CorruptPointer` unless it is a version."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    if text.strip().isdigit() and len(text) < 20:
        return int(text)
    raise CorruptPointer(
        f"the current-version pointer {where} holds {text[:40]!r}, not a version number "
        "(repair it with `oclust snapshots rollback VERSION`)"
    )


def _check_namespace(namespace: str) -> str:
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

    @abstractmethod
    def publish(self, snapshot: Snapshot) -> int:
        """Store ``snapshot`` as the next version, make it current, announce it; return it."""

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


# --------------------------------------------------------------------------- Redis
_ALLOCATE = """
local seq = tonumber(redis.call('INCR', KEYS[1]))
local top = redis.call('ZREVRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if top[2] ~= nil and seq <= tonumber(top[2]) then
  seq = tonumber(top[2]) + 1
  redis.call('SET', KEYS[1], seq)
end
return seq
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
        self.namespace = _check_namespace(namespace)
        self.keep = _check_keep(keep)
        self.poll_interval = poll_interval
        self._url = url
        try:
            self.client = redis.Redis.from_url(
                url, socket_timeout=socket_timeout, socket_connect_timeout=min(socket_timeout, 5)
            )
        except ValueError as exc:
            raise StoreError(f"bad Redis URL {self.url}: {exc}") from None
        self._allocate = self.client.register_script(_ALLOCATE)
        self._prune = self.client.register_script(_PRUNE)
        self._rollback = self.client.register_script(_ROLLBACK)

    @property
    def url(self) -> str:
        parsed = urlparse(self._url)
        host = parsed.hostname or ""
        port = f":{parsed.port}" if parsed.port else ""
        return f"{parsed.scheme}://{host}{port}{parsed.path}"

    def key(self, *parts: object) -> str:
        """``NS:part1:part2``."""
        return ":".join([self.namespace, *map(str, parts)])

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except RedisError as exc:
            raise StoreError(f"Redis at {self.url} failed while {doing}: {exc}") from exc

    def publish(self, snapshot: Snapshot) -> int:
        k = self.key
        with self._errors("publishing a snapshot"):
            version = int(self._allocate(keys=[k("seq"), k("versions")]))
            snap = snapshot.with_version(version)
            notice = json.dumps({"version": version})
            with self.client.pipeline(transaction=True) as pipe:  # MULTI ... EXEC
                pipe.set(k("weights", version), snap.weights)
                pipe.set(k("manifest", version), snap.manifest_json())
                pipe.zadd(k("versions"), {str(version): version})
                pipe.set(k("current"), version)
                pipe.publish(k("events"), notice)
                pipe.execute()
            if self.keep is not None:
                self._prune(keys=[k("current"), k("versions")], args=[k(""), self.keep])
        return version

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


# --------------------------------------------------------------------------- directory
class DirectoryStore(SnapshotStore):
    """Snapshots as files under ``DIR/NS/`` (layout in the module docstring).

    Args:
        root: the store directory (created if missing).
        namespace: sub-directory name.
        keep: versions to keep (``None`` keeps all); the current one is never pruned.
        poll_interval: seconds between polls in :meth:`wait_for_change`.

    Example:
        >>> import tempfile
        >>> DirectoryStore(tempfile.mkdtemp(), "demo").current_version() is None
        True
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        namespace: str = "oclust",
        keep: int | None = DEFAULT_KEEP,
        poll_interval: float = 0.05,
    ) -> None:
        self.namespace = _check_namespace(namespace)
        self.keep = _check_keep(keep)
        self.poll_interval = poll_interval
        self.root = Path(root)

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    @property
    def path(self) -> Path:
        """``DIR/NS``."""
        return self.root / self.namespace

    def _dir(self) -> Path:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create snapshot directory {self.path}: {exc}") from exc
        return self.path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Path]:
        d = self._dir()
        with open(d / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield d
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _files(self, version: int) -> tuple[Path, Path]:
        return (
            self.path / f"weights-{version}.safetensors",
            self.path / f"manifest-{version}.json",
        )

    def publish(self, snapshot: Snapshot) -> int:
        try:
            with self._locked() as d:
                stored = self.versions()
                version = max([*stored, self._seq()]) + 1
                snap = snapshot.with_version(version)
                weights, manifest = self._files(version)
                self._write_atomic(weights, snap.weights)
                self._write_atomic(manifest, snap.manifest_json().encode())
                self._write_atomic(d / "seq", str(version).encode())
                self._write_atomic(d / "current", str(version).encode())
                for old in self._to_prune([*stored, version], version):
                    for f in self._files(old):
                        f.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot write snapshot to {self.path}: {exc}") from exc
        return version

    def _seq(self) -> int:
        try:
            return int((self.path / "seq").read_text())
        except (OSError, ValueError):
            return 0

    def current_version(self) -> int | None:
        try:
            raw = (self.path / "current").read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self.path / 'current'}: {exc}") from exc
        return _pointer(raw, str(self.path / "current"))

    def versions(self) -> list[int]:
        if not self.path.is_dir():
            return []
        out = []
        for f in self.path.glob("manifest-*.json"):
            num = f.stem.removeprefix("manifest-")
            if num.isdigit() and self._files(int(num))[0].exists():
                out.append(int(num))
        return sorted(out)

    def _read(self, version: int) -> tuple[bytes, bytes]:
        weights, manifest = self._files(version)
        try:
            return weights.read_bytes(), manifest.read_bytes()
        except FileNotFoundError:
            raise VersionNotFound(
                f"snapshot version {version} is not stored in {self.path} "
                f"(stored: {self.versions()})"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot read snapshot {version} from {self.path}: {exc}") from exc

    def rollback(self, version: int) -> None:
        try:
            with self._locked() as d:
                if int(version) not in self.versions():
                    raise VersionNotFound(
                        f"cannot roll back to version {version}: not stored in {self.path} "
                        f"(stored: {self.versions()})"
                    )
                self._write_atomic(d / "current", str(int(version)).encode())
        except OSError as exc:
            raise StoreError(f"cannot roll back in {self.path}: {exc}") from exc

    def wait_for_change(self, known: int | None, timeout: float) -> int | None:
        """Poll ``DIR/NS/current`` every ``poll_interval`` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            current = self.current_version()
            remaining = deadline - time.monotonic()
            if current != known or remaining <= 0:
                return current
            time.sleep(min(self.poll_interval, remaining))

    def ping(self) -> bool:
        try:
            self._dir()
            return os.access(self.path, os.W_OK)
        except StoreError:
            return False

    def close(self) -> None:
        """Nothing to release."""


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
