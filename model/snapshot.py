"""Snapshot format: safetensors weights plus a JSON manifest (ARCHITECTURE.md §3). Never pickle.

Integrity (format ``oclust-snapshot/2``): ``manifest["sha256"]`` is the sha256 of the weights and
``manifest["integrity"]`` the sha256 of the canonical manifest JSON (sorted keys, no spaces,
without the ``integrity`` field itself) followed by the weights, so a manifest edited in place is
refused just like a flipped weight byte. It is a checksum against corruption and stray edits, not
a signature: whoever can write the store can recompute it. Snapshots of the older format
``oclust-snapshot/1`` (weights checksum only) are still read; their manifest is unverified.

Reading needs no torch: :func:`unpack_arrays` gives NumPy arrays (``safetensors.numpy``);
:func:`pack_tensors` and :func:`unpack_tensors` import torch when called.

Example:
    >>> from model.snapshot import Snapshot, pack_tensors, unpack_tensors
    >>> import torch
    >>> snap = Snapshot.create(pack_tensors({"centroids": torch.zeros(2, 3)}), {"n_clusters": 2})
    >>> snap.verify(); unpack_tensors(snap.weights)["centroids"].shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMAT", "LEGACY_FORMAT", "Snapshot", "SnapshotError", "pack_tensors", "unpack_arrays",
    "unpack_tensors",
]

FORMAT = "oclust-snapshot/2"
LEGACY_FORMAT = "oclust-snapshot/1"  # weights checksum only; read, never written


class SnapshotError(ValueError):
    """A snapshot that is corrupt, of an unknown format, or does not fit the model."""


def pack_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise named tensors to safetensors bytes (copied to contiguous CPU memory)."""
    from safetensors.torch import save as st_save

    return st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})


def unpack_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into torch tensors; raises :class:`SnapshotError` on garbage."""
    from safetensors.torch import load as st_load

    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise SnapshotError(f"weights are not valid safetensors: {exc}") from exc


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    """Parse safetensors bytes into NumPy arrays, without torch; :class:`SnapshotError` on garbage.

    >>> import numpy as np
    >>> from safetensors.numpy import save
    >>> unpack_arrays(save({"w": np.ones((2, 2), np.float32)}))["w"].dtype
    dtype('float32')
    """
    from safetensors.numpy import load as st_load

    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise SnapshotError(f"weights are not valid safetensors: {exc}") from exc


@dataclass(frozen=True)
class Snapshot:
    """Weights (safetensors bytes) and a JSON-able manifest."""

    weights: bytes
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, weights: bytes, manifest: dict[str, Any]) -> Snapshot:
        """Stamp format, creation time, checksums and version 0 onto a manifest."""
        m = {"version": 0, "created_at": time.time(), **manifest, "format": FORMAT}
        m["sha256"] = hashlib.sha256(weights).hexdigest()
        return cls._sealed(weights, m)

    @classmethod
    def _sealed(cls, weights: bytes, manifest: dict[str, Any]) -> Snapshot:
        m = {k: v for k, v in manifest.items() if k != "integrity"}
        m["integrity"] = _integrity(m, weights)
        return cls(weights, m)

    @property
    def sha256(self) -> str:
        """Hex sha256 of the weights."""
        return hashlib.sha256(self.weights).hexdigest()

    @property
    def version(self) -> int:
        """Version assigned by the store (0 before publishing)."""
        return int(self.manifest.get("version", 0))

    @property
    def legacy(self) -> bool:
        """True for the older format whose manifest carries no checksum."""
        return self.manifest.get("format") == LEGACY_FORMAT

    def verify(self) -> None:
        """Raise :class:`SnapshotError` unless the format and both checksums are right."""
        fmt = self.manifest.get("format")
        if fmt not in (FORMAT, LEGACY_FORMAT):
            raise SnapshotError(f"unknown snapshot format {fmt!r} (this build reads {FORMAT})")
        if self.manifest.get("sha256") != self.sha256:
            raise SnapshotError("snapshot weights do not match the manifest's sha256")
        if fmt == FORMAT and self.manifest.get("integrity") != _integrity(
            self.manifest, self.weights
        ):
            raise SnapshotError(
                "snapshot manifest does not match its integrity checksum (edited or corrupt)"
            )

    def with_version(self, version: int) -> Snapshot:
        """Copy with ``manifest["version"] = version`` (checksum renewed when it had one)."""
        m = {**self.manifest, "version": int(version)}
        return Snapshot(self.weights, m) if self.legacy else Snapshot._sealed(self.weights, m)

    def manifest_json(self) -> str:
        """The manifest as JSON text."""
        return json.dumps(self.manifest, sort_keys=True)

    @classmethod
    def from_parts(cls, weights: bytes, manifest_json: str | bytes) -> Snapshot:
        """Rebuild from stored bytes; raises :class:`SnapshotError` if the manifest is not JSON."""
        try:
            manifest = json.loads(manifest_json)
        except (ValueError, TypeError) as exc:
            raise SnapshotError(f"manifest is not JSON: {exc}") from exc
        if not isinstance(manifest, dict):
            raise SnapshotError("manifest must be a JSON object")
        return cls(bytes(weights), manifest)


def _integrity(manifest: dict[str, Any], weights: bytes) -> str:
    """sha256 of the canonical manifest JSON (``integrity`` left out), a NUL, then the weights."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical + b"\0" + weights).hexdigest()
