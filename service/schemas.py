"""Request and response bodies of the HTTP API (pydantic models; they document the OpenAPI).

The assign endpoints do not validate through these models (:mod:`oclust.service.decoding` reads the
bytes directly, much faster); the models say what those decoders accept.

Example:
    >>> AssignRequest(features=[1.0, 2.0]).features
    [1.0, 2.0]
    >>> AssignBatchRequest(items=[[[1.0, 2.0], [3.0, 4.0]]]).items[0]
    [[1.0, 2.0], [3.0, 4.0]]
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Strict, Tag

__all__ = [
    "AssignBatchRequest",
    "AssignBatchResponse",
    "AssignRequest",
    "AssignResponse",
    "ErrorResponse",
    "NotReadyResponse",
    "StatsResponse",
]


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
    reason: str | None = Field(
        None, description="why not ready; when ready, why the latest load attempt failed (e.g. "
        "a rejected snapshot), if it did", examples=["no snapshot loaded"])
    version: int | None = Field(None, description="loaded snapshot version when ready")
    fallback: str | None = Field(
        None, description="set when the served version is not the one the store points at "
        "(that one could not be loaded, or nothing is pointed): which, why, and what is served "
        "instead"
    )


class MapResponse(BaseModel):
    """Recent latents on their first two principal axes (GET /stats/map)."""

    version: int | None = Field(description="snapshot version being served (null: none yet)")
    n_clusters: int = Field(description="K of the served model (0 before a model is loaded)")
    capacity: int = Field(description="the ring's size: at most this many points")
    latent_dim: int = Field(description="size of the latents (0 before any was recorded)")
    points: list[list[float]] = Field(
        description="(x, y) of each recent served point, oldest first")
    clusters: list[int] = Field(description="the cluster each point was assigned to")
    centroids: list[list[float]] = Field(
        description="(x, y) of each serving centroid, [] when there are no points")
    explained_variance_ratio: list[float] = Field(
        description="share of the points' variance along each of the two axes")


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
