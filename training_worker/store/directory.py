"""Snapshots as files in a local directory (embedded mode, tests, ``oclust up``).

Layout: ``DIR/NS/weights-{v}.safetensors``, ``DIR/NS/manifest-{v}.json`` and ``DIR/NS/current``,
each written to a temporary file first and moved into place with ``os.replace`` (atomic on
POSIX); ``DIR/NS/.lock`` serialises publishers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from oclust.model.snapshot import Snapshot
from oclust.training_worker.store.base import (
    DEFAULT_KEEP,
    SnapshotStore,
    StoreError,
    VersionNotFound,
    _pointer,
)

__all__ = ["DirectoryStore"]

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
        super().__init__(namespace, keep, poll_interval)
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

    def publish(self, snapshot: Snapshot, owner: str | None = None) -> int:
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
