"""Request and response bodies of the HTTP API, and the decoding of feature arrays.

The pydantic models document the API (OpenAPI) and give precise error messages. Decoding takes a
fast path first (parse the JSON once, let NumPy build the array, check dtype, shape and
finiteness) and only on a failure (or a ``true``/``false`` token) runs the strict pydantic
validation to say exactly what is wrong. Either way the result is a float32 batch of the model's
per-sample shape, or an :class:`InputError` (HTTP 422) with a message.

Accepted sample layouts: exactly the model's per-sample shape (a flat vector for vector models,
a C×T nested list for window models), or a flat list of the same numbers in row-major order.

Example:
    >>> decode_features(b'{"features": [1, 2, 3]}', (3,)).shape
    (1, 3)
    >>> decode_items(b'{"items": [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]}', (2, 2), 10).shape
    (2, 2, 2)
    >>> decode_items(b'{"items": [[1, 2, 3, 4]]}', (2, 2), 10).shape
    (1, 2, 2)
    >>> try:
    ...     decode_features(b'{"features": [1, NaN]}', (2,))
    ... except InputError as e:
    ...     print(e)
    features[1]: NaN or infinite value (JSON allows only finite numbers)
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Strict, Tag, ValidationError

__all__ = [
    "AssignBatchRequest",
    "AssignBatchResponse",
    "AssignRequest",
    "AssignResponse",
    "ErrorResponse",
    "InputError",
    "NotReadyResponse",
    "StatsResponse",
    "decode_features",
    "decode_items",
]

F32_MAX = float(np.finfo(np.float32).max)


class InputError(ValueError):
    """A request body that cannot be assigned; the message says why (HTTP 422).

    ``errors`` lists pydantic's per-field errors (``loc``, ``msg``, ``type``) when it has them.
    """

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors


# --------------------------------------------------------------------------- request models
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]


def _layout(value: Any) -> str:
    nested = isinstance(value, list) and bool(value) and isinstance(value[0], list)
    return "matrix" if nested else "vector"


Features = Annotated[
    Annotated[list[Number], Tag("vector")] | Annotated[list[list[Number]], Tag("matrix")],
    Discriminator(_layout),
]

VECTOR_EXAMPLE = [0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0]


class AssignRequest(BaseModel):
    """One sample to assign."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"features": VECTOR_EXAMPLE}]}, extra="ignore"
    )

    features: Features = Field(
        description=(
            "The sample: a flat list of finite numbers for vector models (length = the model's "
            "input size, see GET /model `input_shape`), or a C×T nested list (channels × time "
            "steps) for window models; a flat row-major list of C·T numbers is accepted too. "
            "NaN, Infinity, strings, booleans and nulls are rejected with 422."
        ),
        examples=[VECTOR_EXAMPLE, [[0.1, 0.2, 0.3], [1.0, 0.9, 0.8]]],
    )


class AssignBatchRequest(BaseModel):
    """Several samples to assign in one call."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [VECTOR_EXAMPLE, VECTOR_EXAMPLE[::-1]]}]},
        extra="ignore",
    )

    items: list[Features] = Field(
        description=(
            "Samples, each laid out as `features` of POST /assign, all of the same shape. At "
            "least one and at most the server's batch limit (OCLUST_MAX_BATCH, default 4096)."
        ),
    )


# --------------------------------------------------------------------------- response models
class AssignResponse(BaseModel):
    """The nearest centroid of one sample."""

    cluster: int = Field(description="index of the nearest centroid, 0..K-1", examples=[3])
    distance: float = Field(
        description="squared Euclidean distance from the sample's latent to that centroid",
        examples=[0.42],
    )
    version: int = Field(description="snapshot version that answered", examples=[12])


class AssignBatchResponse(BaseModel):
    """Nearest centroids of a batch, in request order."""

    clusters: list[int] = Field(description="nearest centroid of each item", examples=[[3, 0]])
    distances: list[float] = Field(
        description="squared latent distance of each item to its centroid", examples=[[0.42, 1.3]]
    )
    version: int = Field(description="snapshot version that answered all items", examples=[12])


class ErrorResponse(BaseModel):
    """What went wrong."""

    detail: str = Field(description="human-readable reason", examples=["features[3]: NaN"])
    errors: list[dict[str, Any]] | None = Field(
        None, description="per-field validation errors (loc, msg, type), when there are several"
    )


class NotReadyResponse(BaseModel):
    """Answer of /readyz and of /assign* before a snapshot is loaded."""

    status: str = Field(description="`ready` or `not ready`", examples=["not ready"])
    reason: str | None = Field(None, description="why not ready", examples=["no snapshot loaded"])
    version: int | None = Field(None, description="loaded snapshot version when ready")


class StatsResponse(BaseModel):
    """Live collapse and drift statistics of the recent assignments (GET /stats)."""

    version: int | None = Field(description="snapshot version being served (null: none yet)")
    n_clusters: int = Field(description="K of the served model (0 before a model is loaded)")
    snapshot_created_at: float | None = Field(description="unix time the snapshot was made")
    snapshot_age_seconds: float | None = Field(description="seconds since the snapshot was made")
    store_up: bool | None = Field(description="store reachable at the last attempt (null: none)")
    window: int = Field(description="configured sliding-window size W")
    filled: int = Field(description="assignments currently in the window (at most W)")
    samples_seen: int = Field(description="assignments recorded since the window (re)started")
    counts: list[int] = Field(description="hard labels per cluster in the window")
    shares: list[float] = Field(description="counts divided by filled: the cluster shares")
    totals: list[int] = Field(description="assignments per cluster since the process started")
    prior: list[float] = Field(description="prior (after smoothing) that KL* is measured against")
    hard_entropy: float | None = Field(description="entropy of the shares, nats (max log K)")
    hard_entropy_ratio: float | None = Field(description="hard entropy / log K, 0..1")
    soft_entropy: float | None = Field(description="entropy of the mean soft assignment, nats")
    kl_star: float | None = Field(description="KL(shares || prior), nats")
    drift_js: float | None = Field(
        description="Jensen-Shannon divergence (nats, ≤ log 2) of the window vs the W before it"
    )
    drift_reference: str = Field(description="what drift compares against: `previous_window`")


# --------------------------------------------------------------------------- decoding
def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if part in ("vector", "matrix"):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _explain(exc: ValidationError) -> InputError:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = []
    for err in errors[:5]:
        msg = err["msg"]
        if err["type"] == "finite_number":
            msg = "NaN or infinite value (JSON allows only finite numbers)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        parts.append(f"{_loc(tuple(err['loc']))}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors[:20]]
    return InputError("; ".join(parts) + more, details)


def _parse(body: bytes, key: str) -> tuple[Any, bool]:
    """``(body[key], numeric_ok)`` via the fast JSON parser (``None`` if absent or not JSON).

    ``numeric_ok`` is False when the body has a ``true``/``false`` token: NumPy would quietly
    turn booleans into numbers, so the strict path must decide.
    """
    try:  # orjson: strict JSON (NaN, huge integers...) fails here and the strict path explains
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, False
    if not isinstance(obj, dict):
        return None, False
    return obj.get(key), b"true" not in body and b"false" not in body


def _as_array(raw: Any) -> np.ndarray | None:
    """NumPy array of numbers, or ``None`` when ``raw`` is not a regular array of numbers."""
    try:
        arr = np.asarray(raw)
    except (ValueError, TypeError, OverflowError):
        return None
    return arr if arr.dtype.kind in "fiu" else None


def _finite32(arr: np.ndarray, what: str) -> np.ndarray:
    """float32 copy of ``arr``; :class:`InputError` naming the first non-finite value."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    if np.isfinite(out).all():
        return out
    bad = np.argwhere(~np.isfinite(out))[0]
    where = what + "".join(f"[{i}]" for i in bad)
    value = arr[tuple(bad)]
    if np.isfinite(value):
        raise InputError(f"{where}: {float(value):g} is outside the float32 range (±{F32_MAX:.3g})")
    raise InputError(f"{where}: NaN or infinite value (JSON allows only finite numbers)")


def _fit_shape(arr: np.ndarray, shape: tuple[int, ...], batched: bool, what: str) -> np.ndarray:
    """Reshape to (N, *shape), accepting flat samples of the right size."""
    sample = arr.shape[1:] if batched else arr.shape
    if sample == shape:
        return arr if batched else arr[None]
    size = math.prod(shape)
    if len(sample) == 1 and sample[0] == size:
        return arr.reshape((-1, *shape))
    noun = "each item must" if batched else "must"
    raise InputError(
        f"{what}: {noun} have shape {list(shape)} (or be a flat list of {size} numbers), "
        f"got shape {list(sample)}"
    )


def _strict(model: type[BaseModel], body: bytes) -> BaseModel:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _explain(exc) from None


def decode_features(body: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """The ``features`` of an :class:`AssignRequest` body as a float32 batch (1, *shape)."""
    raw, numeric_ok = _parse(body, "features")
    arr = _as_array(raw) if numeric_ok and raw is not None else None
    if arr is None or arr.ndim == 0:
        req = _strict(AssignRequest, body)
        arr = _as_array(req.features)  # type: ignore[attr-defined]
        if arr is None:
            raise InputError("features: rows of a C×T sample must all have the same length")
    if arr.size == 0:
        raise InputError("features: empty; send the sample's numbers")
    return _fit_shape(_finite32(arr, "features"), shape, batched=False, what="features")


def _item_shape(item: list[Any], index: int) -> list[int]:
    try:
        return list(np.asarray(item, dtype=np.float64).shape)
    except ValueError:
        raise InputError(
            f"items[{index}]: rows of a C×T sample must all have the same length"
        ) from None


def _too_many(n: int, max_batch: int) -> InputError:
    return InputError(
        f"items: {n} items exceed the batch limit of {max_batch} (split the batch)"
    )


def decode_items(body: bytes, shape: tuple[int, ...], max_batch: int) -> np.ndarray:
    """The ``items`` of an :class:`AssignBatchRequest` body as a float32 batch (N, *shape)."""
    raw, numeric_ok = _parse(body, "items")
    if isinstance(raw, list) and len(raw) > max_batch:
        raise _too_many(len(raw), max_batch)
    arr = _as_array(raw) if numeric_ok and raw is not None else None
    if arr is None or arr.ndim < 2:
        items = _strict(AssignBatchRequest, body).items  # type: ignore[attr-defined]
        if len(items) > max_batch:
            raise _too_many(len(items), max_batch)
        if not items:
            raise InputError("items: empty; send at least one sample")
        arr = _as_array(items)
        if arr is None or arr.ndim < 2:
            first = _item_shape(items[0], 0)
            for i, item in enumerate(items[1:], start=1):
                if (s := _item_shape(item, i)) != first:
                    raise InputError(
                        f"items: all items must have the same shape; items[0] has shape "
                        f"{first}, items[{i}] has {s}"
                    )
            raise InputError("items: each item must be a non-empty list of numbers")
    if arr.size == 0:
        raise InputError("items: empty items; send at least one sample with numbers")
    return _fit_shape(_finite32(arr, "items"), shape, batched=True, what="items")
