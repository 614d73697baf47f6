"""The FastAPI assignment service: POST /assign, /assign/batch, the manifest, health, metrics.

``create_app(settings, holder)`` needs only ``model`` and a :class:`~oclust.service.loader.ModelHolder`;
whatever keeps the holder current (the snapshot watcher of ``oclust serve``) is passed in as a
background task and started/stopped with the server.

Endpoints:

* ``POST /assign`` ``{"features": [...]}`` → ``{"cluster", "distance", "version"}``
* ``POST /assign/batch`` ``{"items": [[...], ...]}`` → ``{"clusters", "distances", "version"}``;
  also a raw little-endian float32 body (``Content-Type: application/octet-stream``, rows back to
  back, their count inferred from the length) and, with ``Accept: application/octet-stream``, a
  binary answer: N int32 clusters then N float32 distances (little-endian), the version in the
  ``X-Oclust-Version`` header and N in ``X-Oclust-Count``.
* ``GET /model`` the snapshot manifest · ``GET /healthz`` alive · ``GET /readyz`` 200 once a
  snapshot is loaded, 503 with the reason before · ``GET /metrics`` Prometheus ·
  ``GET /stats`` the live collapse/drift numbers as JSON · ``GET /stats/map`` recent latents in
  2-D (PCA) · ``GET /docs`` OpenAPI.

The jobs live in their own modules: :mod:`oclust.service.assign` (the raw assign endpoints),
:mod:`oclust.service.endpoints` (the GET routes), :mod:`oclust.service.middleware` (API key, body limit,
request counting), :mod:`oclust.service.metrics` (Prometheus) and :mod:`oclust.service.openapi`.

Client mistakes get 4xx with a message, never 5xx: bad JSON, NaN/inf, wrong shapes, non-numbers,
features beyond ``max_abs_feature`` (``out_of_range``), empty or missing fields and oversized
batches → 422; bodies over ``max_body_bytes`` → 413 (by Content-Length, or counted while
streaming); a POST whose Content-Type is neither JSON nor octet-stream → 415 (no cross-site form
posts); a body not received within ``body_timeout`` → 408; a wrong or missing API key (when one
is set) → 401, on /assign* and on /model, /stats* and /metrics unless they are configured open; no
snapshot loaded → 503. A client that disconnects mid-request is counted as 499. Validation stops
at the first few errors and large bodies are decoded off the event loop, so one hostile request
never stalls /healthz.

Example:
    >>> import asyncio, httpx
    >>> app = create_app(ServiceSettings())
    >>> async def ready() -> tuple[int, str]:
    ...     transport = httpx.ASGITransport(app=app)
    ...     async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
    ...         r = await client.get("/readyz")
    ...         return r.status_code, r.json()["reason"]
    >>> asyncio.run(ready())
    (503, 'no snapshot loaded yet')
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

from fastapi import FastAPI
from starlette.routing import Route

from oclust.service.assign import AssignEndpoint, Assigner
from oclust.service.endpoints import info_router
from oclust.service.loader import ModelHolder
from oclust.service.metrics import ServiceMetrics
from oclust.service.middleware import LimitsMiddleware
from oclust.service.monitor import AssignmentMonitor
from oclust.service.openapi import DESCRIPTION, install_openapi
from oclust.service.settings import ServiceSettings

__all__ = ["Background", "create_app"]


class Background(Protocol):
    """Something started with the server and stopped after it (e.g. the snapshot watcher)."""

    def start(self) -> None: ...

    def stop(self, timeout: float | None = None) -> None: ...


def create_app(
    settings: ServiceSettings | None = None,
    holder: ModelHolder | None = None,
    background: Iterable[Background] = (),
) -> FastAPI:
    """Build the service around ``holder`` (a new, empty one by default).

    ``background`` objects are started when the server starts and stopped when it stops.
    The app's state carries ``holder``, ``monitor``, ``metrics`` and ``settings``.
    """
    settings = settings or ServiceSettings()
    holder = holder or ModelHolder()
    tasks = list(background)
    monitor = AssignmentMonitor(window=settings.window)
    holder.subscribe(lambda m: monitor.configure(m.n_clusters, m.prior))
    metrics = ServiceMetrics(holder, monitor)
    key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for task in tasks:
            task.start()
        try:
            yield
        finally:
            for task in tasks:
                task.stop()

    app = FastAPI(title="oclust", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings, app.state.holder = settings, holder
    app.state.monitor, app.state.metrics = monitor, metrics
    protected = {"/assign", "/assign/batch"}
    for paths, flag in ((("/model",), settings.protect_model),
                        (("/stats", "/stats/map"), settings.protect_stats),
                        (("/metrics",), settings.protect_metrics)):
        if flag:
            protected.update(paths)
    app.add_middleware(LimitsMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics,
                       api_key=key, protected=frozenset(protected))
    install_openapi(app, secured=key is not None, protected=frozenset(protected))

    # The assign endpoints are plain ASGI routes, matched first (documented by the custom
    # OpenAPI above): FastAPI's dependency machinery would cost a sizeable share of a request.
    assigner = Assigner(holder, monitor, settings)
    app.router.routes[:0] = [
        Route("/assign", AssignEndpoint(assigner.single, metrics.latency_assign,
                                        settings.body_timeout),
              methods=["POST"], include_in_schema=False),
        Route("/assign/batch", AssignEndpoint(assigner.batch, metrics.latency_batch,
                                              settings.body_timeout),
              methods=["POST"], include_in_schema=False),
    ]

    app.include_router(info_router(holder, monitor, metrics))
    return app
