"""Snapshot format: safetensors weights plus a JSON manifest (ARCHITECTURE.md §3). Never pickle.

Integrity (format ``oclust-snapshot/2``): ``manifest["sha256"]`` is the sha256 of the weights and
``manifest["integrity"]`` the sha256 of the canonical manifest JSON (sorted keys, no spaces,
without the ``integrity`` field itself) followed by the weights, so a manifest edited in place is
refused just like a flipped weight byte. It is a checksum against corruption and stray edits, not
a signature: whoever can write the store can recompute it. Snapshots of the older format
``oclust-snapshot/1`` (weights checksum only) are still read; their manifest is unverified.

Reading needs no torch: :func:`unpack_arrays` gives NumPy arrays (``safetensors.numpy``);
:func:`pack_tensors` and :func:`unpack_tensors` import torch when called.

:attr:`Snapshot.manifest` is the manifest exactly as stored (a JSON object: what is hashed and
written back); :attr:`Snapshot.meta` reads it as one typed :class:`Manifest`, which is what the
model, worker, store, service and CLI use. Fields this build does not know are kept, untouched,
in the stored JSON (so the checksum of a newer writer's manifest still holds) and in
:attr:`Manifest.extra`; nothing here interprets them.

Example:
    >>> from oclust.model.snapshot import Snapshot, pack_tensors, unpack_tensors
    >>> import torch
    >>> snap = Snapshot.create(pack_tensors({"centroids": torch.zeros(2, 3)}), {"n_clusters": 2})
    >>> snap.verify(); unpack_tensors(snap.weights)["centroids"].shape
    torch.Size([2, 3])
    >>> snap.meta.n_clusters, snap.meta.format, snap.meta.offsets
    (2, 'oclust-snapshot/2', {})
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMAT",
    "LEGACY_FORMAT",
    "SAMPLE_HELD",
    "SAMPLE_INPUTS",
    "SAMPLE_PREFIX",
    "SQRT_FLOAT32_MAX",
    "Manifest",
    "OffsetState",
    "Snapshot",
    "SnapshotError",
    "check_finite_weights",
    "pack_arrays",
    "pack_tensors",
    "unpack_arrays",
    "unpack_tensors",
]

SQRT_FLOAT32_MAX = float(np.sqrt(np.finfo(np.float32).max))  # about 1.8e19: larger weights
# square to infinity in float32 (a blown-up model)
FORMAT = "oclust-snapshot/2"
LEGACY_FORMAT = "oclust-snapshot/1"  # weights checksum only; read, never written
# What a model holds beyond a stream offset, per "topic:partition" (a training worker's): the
# first "rows" of the multi-sample message at the offset (cut between two batches), or, of the
# messages in [offset, "until"), all but those in the "waiting" [lo, hi) spans (readings not yet
# in a trained window). A resumed worker skips what is held.
OffsetState = dict[str, dict[str, Any]]
# Tensors a snapshot's writer may store beside the model and no model reads: a training worker's
# sample of older inputs ("sample.inputs", raw, float32) and how many it held ("sample.held"),
# which a worker resumed from the snapshot judges its next snapshots on
SAMPLE_PREFIX = "sample."
SAMPLE_INPUTS, SAMPLE_HELD = f"{SAMPLE_PREFIX}inputs", f"{SAMPLE_PREFIX}held"


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


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Serialise named NumPy arrays to safetensors bytes, without torch (:func:`unpack_arrays`
    reads them back)."""
    from safetensors.numpy import save as st_save

    return st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


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


def check_finite_weights(arrays: dict[str, np.ndarray]) -> None:
    """:class:`SnapshotError` when a float weight (the optimiser's state and a stored sample
    aside: no model reads them) is NaN or infinite, or a trained weight is beyond
    :data:`SQRT_FLOAT32_MAX` (its square, and so every distance, would overflow): such a model
    answers nothing, so it is neither snapshotted nor served. Statistics (the input scaler's
    float64 running sums, BatchNorm's running mean and variance) only need to be finite: a sum
    of squared deviations legitimately grows past that bound on a long stream.

    >>> check_finite_weights({"w": np.ones(2), "optim.0.exp_avg": np.array([np.inf]),
    ...                       "scaler.m2": np.array([1e30])})
    >>> check_finite_weights({"w": np.array([1.0, 1e30])})
    Traceback (most recent call last):
    ...
    oclust.model.snapshot.SnapshotError: weight 'w' holds NaN, infinite or overflowing values
    """
    for name, value in arrays.items():
        if name.startswith(("optim.", SAMPLE_PREFIX)) or value.dtype.kind != "f" or not value.size:
            continue
        largest = float(np.abs(value).max())
        bound = math.inf if _is_statistic(name) else SQRT_FLOAT32_MAX
        if not largest < bound:  # NaN compares False
            raise SnapshotError(f"weight {name!r} holds NaN, infinite or overflowing values")


def _is_statistic(name: str) -> bool:
    """A running statistic, not a trained weight (never squared in float32 by serving)."""
    return name.startswith("scaler.") or name.rsplit(".", 1)[-1] in ("running_mean", "running_var")


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"expected an integer, got {value!r}")
    return int(value)


def _count(value: Any) -> int:
    count = _integer(value)
    if count < 0:
        raise ValueError(f"expected a count (>= 0), got {value!r}")
    return count


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):  # bool("false") is True
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a JSON object, got {value!r}")
    return dict(value)


def _offsets(value: Any) -> dict[str, int]:
    return {str(k): _count(v) for k, v in _mapping(value).items()}


def _offset_state(value: Any) -> OffsetState:
    out: OffsetState = {}
    for key, state in _mapping(value).items():
        state = _mapping(state)
        if set(state) - {"rows", "until", "waiting"}:
            raise ValueError(f"unknown keys in {state!r}")
        checked: dict[str, Any] = {k: _count(state[k]) for k in ("rows", "until") if k in state}
        if "waiting" in state:
            spans = [[_count(lo), _count(hi)] for lo, hi in state["waiting"]]
            if any(lo >= hi for lo, hi in spans):
                raise ValueError(f"empty span in {state['waiting']!r}")
            ends = [b for span in spans for b in span]  # looked up by bisection: in order
            if ends != sorted(ends) or (ends and ends[-1] > checked.get("until", ends[-1])):
                raise ValueError(f"spans out of order or past 'until' in {state!r}")
            checked["waiting"] = spans
        out[str(key)] = checked
    return out


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(_count(s) for s in value)


def _floats(value: Any) -> list[float]:
    return [float(p) for p in value]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"expected a list of strings, got {value!r}")
    return list(value)


def _created(value: Any) -> float | None:
    """A creation time that is not a number reads as unknown (``None``), never as an error."""
    return float(value) if isinstance(value, int | float) else None


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Manifest:
    """The snapshot manifest as one typed, immutable record (JSON object on disk).

    The *envelope* (``format``, ``version``, ``created_at``, ``sha256``, ``integrity``) is
    stamped by :class:`Snapshot`; the rest describes the model and the stream position, written
    by :meth:`oclust.model.clusterer.OnlineClusterer.to_snapshot`. Every field may be absent from an
    older or hand-made manifest: it then reads as its default, and code that needs it asks for
    it with :meth:`required`. A present field of the wrong type raises :class:`SnapshotError`.
    Unknown fields are preserved, read-only, in :attr:`extra` (and written back by
    :meth:`to_dict`); no code here acts on them.

    >>> m = Manifest.from_dict({"n_clusters": 3, "offsets": {"t:0": 7}, "future": [1]})
    >>> m.n_clusters, m.offsets, m.samples_seen, dict(m.extra)
    (3, {'t:0': 7}, 0, {'future': [1]})
    >>> Manifest.from_dict(m.to_dict()) == m
    True
    >>> m.required("sigma")
    Traceback (most recent call last):
    ...
    oclust.model.snapshot.SnapshotError: manifest is missing 'sigma'
    """

    # envelope (Snapshot.create / with_version)
    format: str | None = None
    version: int = 0
    created_at: float | None = None  # unix time; None when absent or not a number
    sha256: str | None = None
    integrity: str | None = None
    # the model (always written by to_snapshot)
    regulariser: str | None = None
    reg_params: dict[str, Any] = field(default_factory=dict)
    n_clusters: int | None = None
    input_shape: tuple[int, ...] = ()
    encoder: dict[str, Any] | None = None  # model.encoders.EncoderConfig.to_dict()
    latent_dim: int | None = None
    sigma: float | None = None
    prior: list[float] | None = None
    prior_mode: str | None = None  # "uniform", "fixed" or "online"
    prior_state: dict[str, Any] | None = None  # model.priors.OnlinePrior.state(), read by it
    lr: float | None = None
    betas: list[float] | None = None  # Adam's; absent in manifests older than the field
    standardize: bool | None = None
    clip: float | None = None  # of the standardised inputs; absent (older manifests): none
    init: str = "kmeans"
    views: bool = False  # augmented views in training; absent (older manifests): none
    input_guide: int = 0  # CA's guided first steps (model.guide); absent (older manifests): none
    seed: int | None = None
    # the column names of the DataFrame the model was fitted on (its feature_names_in_, which
    # inference checks); None: fitted on unnamed data, or a manifest older than the field
    feature_names: list[str] | None = None
    # training progress and the stream position it covers
    samples_seen: int = 0
    steps: int = 0
    offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> next offset
    # "topic:partition" -> what the model holds beyond that offset, which a resumed worker skips
    # (see OffsetState)
    offset_state: OffsetState = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # float or list of floats each
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    _ENVELOPE = ("format", "version", "created_at", "sha256", "integrity")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Read a stored manifest; :class:`SnapshotError` names a field of the wrong type."""
        if not isinstance(data, Mapping):
            raise SnapshotError("manifest must be a JSON object")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra" or data.get(f.name) is None:
                continue
            convert = _CONVERT.get(f.name, _same)
            try:
                values[f.name] = convert(data[f.name])
            except (TypeError, ValueError, LookupError) as exc:  # never another exception
                raise SnapshotError(f"manifest field {f.name!r} is bad: {exc}") from exc
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**values, extra=MappingProxyType(extra))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: every model field, the envelope fields that are set, the extras."""
        out: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (f.name in self._ENVELOPE and value is None):
                continue
            out[f.name] = list(value) if f.name == "input_shape" else value
        return out

    def required(self, name: str) -> Any:
        """The value of field ``name``; :class:`SnapshotError` when the manifest lacks it."""
        value = getattr(self, name)
        if value is None:
            raise SnapshotError(f"manifest is missing {name!r}")
        return value


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "format": str, "version": _integer, "created_at": _created, "sha256": str, "integrity": str,
    "regulariser": str, "reg_params": _mapping, "n_clusters": _count, "input_shape": _shape,
    "encoder": _mapping, "latent_dim": _count, "sigma": float, "prior": _floats,
    "prior_mode": str, "lr": float, "betas": _floats, "standardize": _flag, "clip": float,
    "init": str, "views": _flag, "input_guide": _count, "seed": _integer,
    "feature_names": _strings,
    "samples_seen": _count, "steps": _count,
    "offsets": _offsets, "offset_state": _offset_state, "metrics": _mapping,
}


@dataclass(frozen=True)
class Snapshot:
    """Weights (safetensors bytes) and a JSON-able manifest."""

    weights: bytes
    manifest: dict[str, Any] = field(default_factory=dict)  # as stored: what is hashed

    @classmethod
    def create(cls, weights: bytes, manifest: Manifest | dict[str, Any]) -> Snapshot:
        """Stamp format, creation time, checksums and version 0 onto a manifest."""
        if isinstance(manifest, Manifest):
            manifest = manifest.to_dict()
        m = {"version": 0, "created_at": time.time(), **manifest, "format": FORMAT}
        m["sha256"] = hashlib.sha256(weights).hexdigest()
        return cls._sealed(weights, m)

    @classmethod
    def _sealed(cls, weights: bytes, manifest: dict[str, Any]) -> Snapshot:
        m = {k: v for k, v in manifest.items() if k != "integrity"}
        m["integrity"] = _integrity(m, weights)
        return cls(weights, m)

    @property
    def meta(self) -> Manifest:
        """The manifest as a typed :class:`Manifest` (read afresh from :attr:`manifest`)."""
        return Manifest.from_dict(self.manifest)

    @property
    def sha256(self) -> str:
        """Hex sha256 of the weights."""
        return hashlib.sha256(self.weights).hexdigest()

    @property
    def version(self) -> int:
        """Version assigned by the store (0 before publishing)."""
        return self.meta.version

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
        except RecursionError:  # b"[" * 100000: the parser recurses per nesting level
            raise SnapshotError("manifest is not JSON: nested too deeply") from None
        if not isinstance(manifest, dict):
            raise SnapshotError("manifest must be a JSON object")
        return cls(bytes(weights), manifest)


def _integrity(manifest: dict[str, Any], weights: bytes) -> str:
    """sha256 of the canonical manifest JSON (``integrity`` left out), a NUL, then the weights."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical + b"\0" + weights).hexdigest()
