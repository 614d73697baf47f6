"""The service's FastAPI routes besides /assign: the manifest, health, metrics, stats, live page.

``GET /model`` the snapshot manifest · ``GET /healthz`` alive · ``GET /readyz`` 200 once a
snapshot is loaded, 503 with the reason before · ``GET /metrics`` Prometheus · ``GET /stats``
the live collapse/drift numbers as JSON · ``GET /stats/map`` the latents of recent served points
on their two principal axes · ``GET /`` the live page.

Example:
    >>> import asyncio, httpx
    >>> from fastapi import FastAPI
    >>> from oclust.service.loader import ModelHolder
    >>> from oclust.service.metrics import ServiceMetrics
    >>> from oclust.service.monitor import AssignmentMonitor
    >>> holder, monitor = ModelHolder(), AssignmentMonitor()
    >>> app = FastAPI()
    >>> app.include_router(info_router(holder, monitor, ServiceMetrics(holder, monitor)))
    >>> async def get(path: str) -> int:
    ...     transport = httpx.ASGITransport(app=app)
    ...     async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
    ...         return (await client.get(path)).status_code
    >>> asyncio.run(get("/healthz")), asyncio.run(get("/model"))
    (200, 503)
"""

from __future__ import annotations

import functools
import math
import time
from importlib import resources
from typing import Any

import pydantic_core
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from oclust.service.assign import JSON, not_ready
from oclust.service.loader import ModelHolder
from oclust.service.metrics import ServiceMetrics
from oclust.service.monitor import AssignmentMonitor
from oclust.service.schemas import MapResponse, NotReadyResponse, StatsResponse

__all__ = ["info_router", "latent_map", "live_stats"]


def info_router(
    holder: ModelHolder, monitor: AssignmentMonitor, metrics: ServiceMetrics
) -> APIRouter:
    """The GET routes, answering from ``holder``, ``monitor`` and ``metrics``."""
    router = APIRouter()

    @router.get(
        "/model",
        summary="Manifest of the served snapshot",
        responses={
            200: {"description": "the snapshot manifest (JSON object)"},
            503: {"model": NotReadyResponse, "description": "no snapshot loaded yet"},
        },
    )
    async def get_model() -> Response:
        model = holder.current
        if model is None:
            return Response(not_ready(holder)[1], status_code=503, media_type=JSON)
        return Response(model.manifest_json, media_type=JSON)

    @router.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/readyz",
        summary="Readiness: 200 once a snapshot is loaded (`fallback` says when it is not the "
        "pointed version, `reason` the last failed load, if any), 503 with the reason before",
        response_model=NotReadyResponse,
        responses={503: {"model": NotReadyResponse, "description": "no snapshot loaded yet"}},
    )
    async def readyz() -> Response:
        model = holder.current
        if model is None:
            return Response(not_ready(holder)[1], status_code=503, media_type=JSON)
        payload = {"status": "ready", "reason": holder.last_error, "version": model.version,
                   "fallback": holder.fallback}  # ready: it serves, whatever failed since
        return Response(pydantic_core.to_json(payload), media_type=JSON)

    @router.get("/metrics", summary="Prometheus metrics (text exposition format)",
                response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/stats", summary="Live collapse and drift statistics",
                response_model=StatsResponse)
    async def stats() -> Response:
        return Response(pydantic_core.to_json(live_stats(holder, monitor)), media_type=JSON)

    @router.get("/stats/map", summary="Recent served points' latents projected on their two "
                "principal axes, with their clusters and the projected centroids (the live "
                "page's map)", response_model=MapResponse)
    async def stats_map() -> Response:
        return Response(pydantic_core.to_json(latent_map(holder, monitor)), media_type=JSON)

    @router.get("/", summary="The live page: cluster shares, collapse metrics, a form for "
                "/assign", response_class=HTMLResponse)
    async def live_page() -> HTMLResponse:
        return HTMLResponse(_live_page())

    return router


@functools.cache
def _live_page() -> bytes:
    """The self-contained live page (no CDN: it polls /stats and /model)."""
    return resources.files(__package__).joinpath("static", "index.html").read_bytes()


def live_stats(holder: ModelHolder, monitor: AssignmentMonitor) -> dict[str, Any]:
    """What ``GET /stats`` answers: window statistics plus the served snapshot's state."""
    model = holder.current
    s = monitor.stats().to_dict()
    created = None if model is None else model.created_at
    s.update(
        version=None if model is None else model.version,
        snapshot_created_at=created,
        snapshot_age_seconds=None if created is None else max(0.0, time.time() - created),
        store_up=holder.store_up,
    )
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in s.items()}


def latent_map(holder: ModelHolder, monitor: AssignmentMonitor) -> dict[str, Any]:
    """What ``GET /stats/map`` answers: the monitor's map with the served centroids."""
    model = holder.current
    centroids = None if model is None else model.infer.centroids
    out = monitor.latent_map(centroids).to_dict()
    out.update(version=None if model is None else model.version, n_clusters=monitor.n_clusters)
    return out
