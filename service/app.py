"""The FastAPI assignment service: POST /assign, /assign/batch, the manifest, health, metrics.

``create_app(settings, holder)`` needs only ``model`` and a :class:`~service.loader.ModelHolder`;
whatever keeps the holder current (the snapshot watcher of ``oclust serve``) is passed in as a
background task and started/stopped with the server.

Endpoints:

* ``POST /assign`` ``{"features": [...]}`` → ``{"cluster", "distance", "version"}``
* ``POST /assign/batch`` ``{"items": [[...], ...]}`` → ``{"clusters", "distances", "version"}``
* ``GET /model`` the snapshot manifest · ``GET /healthz`` alive · ``GET /readyz`` 200 once a
  snapshot is loaded, 503 with the reason before · ``GET /metrics`` Prometheus ·
  ``GET /stats`` the live collapse/drift numbers as JSON · ``GET /docs`` OpenAPI.

Client mistakes get 4xx with a message, never 5xx: bad JSON, NaN/inf, wrong shapes, non-numbers,
empty or missing fields and oversized batches → 422; bodies over ``max_body_bytes`` → 413 (by
Content-Length, or counted while streaming); a wrong or missing API key (when one is set) → 401;
no snapshot loaded → 503.

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
import functools
import hmac
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from importlib import resources
from typing import Any, Protocol

import numpy as np
import pydantic_core
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import Route

from service.loader import Assignment, LoadedModel, ModelHolder
from service.monitor import AssignmentMonitor
from service.schemas import (
    AssignBatchRequest,
    AssignBatchResponse,
    AssignRequest,
    AssignResponse,
    ErrorResponse,
    InputError,
    NotReadyResponse,
    StatsResponse,
    decode_features,
    decode_items,
)
from service.settings import ServiceSettings

__all__ = [
    "AssignEndpoint",
    "Assigner",
    "Background",
    "LimitsMiddleware",
    "ServiceMetrics",
    "create_app",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENDPOINTS = frozenset(
    ["/", "/assign", "/assign/batch", "/model", "/healthz", "/readyz", "/metrics", "/stats",
     "/docs", "/openapi.json"]
)
LATENCY_BUCKETS = (
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
)
JSON = "application/json"
Answer = tuple[int, bytes]  # HTTP status, JSON body
NAN = float("nan")


class Background(Protocol):
    """Something started with the server and stopped after it (e.g. the snapshot watcher)."""

    def start(self) -> None: ...

    def stop(self, timeout: float | None = None) -> None: ...


# --------------------------------------------------------------------------- metrics
class _LiveCollector(Collector):
    """Window statistics and snapshot state, computed when Prometheus scrapes."""

    def __init__(self, holder: ModelHolder, monitor: AssignmentMonitor) -> None:
        self.holder = holder
        self.monitor = monitor

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        s = self.monitor.stats()
        total = CounterMetricFamily(
            "oclust_assignments", "Points assigned per cluster since start.", labels=["cluster"]
        )
        share = GaugeMetricFamily(
            "oclust_cluster_share", "Share of each cluster in the recent window.",
            labels=["cluster"],
        )
        for k in range(s.n_clusters):
            total.add_metric([str(k)], s.totals[k])
            share.add_metric([str(k)], s.shares[k] if s.filled else NAN)
        yield total
        yield share

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=NAN if value is None else float(value))

        yield gauge("oclust_hard_entropy_nats", "Entropy of the window's hard labels (nats).",
                    s.hard_entropy)
        yield gauge("oclust_hard_entropy_ratio", "Hard entropy divided by log K.",
                    s.hard_entropy_ratio)
        yield gauge("oclust_kl_star_nats", "KL(window cluster distribution || prior) (nats).",
                    s.kl_star)
        yield gauge("oclust_soft_entropy_nats", "Entropy of the window's mean soft assignment.",
                    s.soft_entropy)
        yield gauge("oclust_drift_js", "Jensen-Shannon divergence of the window vs the previous "
                    "window (nats).", s.drift_js)
        model = self.holder.current
        yield gauge("oclust_snapshot_version", "Snapshot version being served.",
                    None if model is None else model.version)
        age = None
        if model is not None and model.created_at is not None:
            age = max(0.0, time.time() - model.created_at)
        yield gauge("oclust_snapshot_age_seconds", "Seconds since the served snapshot was made.",
                    age)
        if self.holder.store_up is not None:
            yield gauge("oclust_store_up", "1 when the snapshot store answered the last attempt.",
                        1.0 if self.holder.store_up else 0.0)


class ServiceMetrics:
    """The app's own Prometheus registry (so several apps can live in one process).

    Example:
        >>> m = ServiceMetrics(ModelHolder(), AssignmentMonitor())
        >>> b"oclust_snapshot_version NaN" in m.render()
        True
    """

    def __init__(self, holder: ModelHolder, monitor: AssignmentMonitor) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_LiveCollector(holder, monitor))
        self.latency = Histogram(
            "oclust_assign_latency_seconds",
            "Time to answer /assign and /assign/batch (parse, infer, respond).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.latency_assign = self.latency.labels("assign")
        self.latency_batch = self.latency.labels("assign_batch")
        self.requests = Counter(
            "oclust_http_requests",
            "HTTP requests by endpoint and status class.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, str], Any] = {}

    def count_request(self, endpoint: str, status: int) -> None:
        """Count one answered request (status as 2xx/4xx/5xx)."""
        key = (endpoint, f"{status // 100}xx")
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(*key)
        child.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


# --------------------------------------------------------------------------- middleware
class _BodyTooLarge(Exception):
    pass


class LimitsMiddleware:
    """Pure ASGI middleware: body-size limit (413) and per-endpoint request counting.

    The limit is checked against Content-Length before the app runs and against the bytes
    actually received while the body streams in (chunked uploads, lying headers).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: ServiceMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            await self._too_large(send_wrapper, f"{length} bytes declared")
        elif length == -1:
            await _respond(send_wrapper, 400, {"detail": "invalid Content-Length header"})
        else:
            received = 0

            async def receive_wrapper() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise _BodyTooLarge
                return message

            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except _BodyTooLarge:
                if started:
                    raise
                await self._too_large(send_wrapper, f"over {received} bytes sent")
            except Exception:
                self.metrics.count_request(endpoint, 500)
                raise
        self.metrics.count_request(endpoint, status)

    async def _too_large(self, send: Send, what: str) -> None:
        detail = f"request body too large ({what}; the limit is {self.max_body_bytes} bytes)"
        await _respond(send, 413, {"detail": detail})


def _content_length(scope: Scope) -> int | None:
    """Declared body length; ``None`` if absent, -1 if malformed."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                n = int(value)
            except ValueError:
                return -1
            return n if n >= 0 else -1
    return None


async def _respond(send: Send, status: int, body: dict[str, Any]) -> None:
    await _send_json(send, status, pydantic_core.to_json(body))


# --------------------------------------------------------------------------- raw endpoints
class _Disconnected(Exception):
    pass


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _error(status: int, detail: str, errors: list[dict[str, Any]] | None = None) -> Answer:
    body: dict[str, Any] = {"detail": detail}
    if errors:
        body["errors"] = errors
    return status, pydantic_core.to_json(body)


def _not_ready(holder: ModelHolder) -> Answer:
    return 503, pydantic_core.to_json(
        {"status": "not ready", "reason": holder.not_ready_reason(), "version": None}
    )


def _infer(model: LoadedModel, batch: np.ndarray) -> Assignment:
    result = model.assign(batch)
    d = result.distances
    finite = math.isfinite(d[0]) if len(d) == 1 else bool(np.isfinite(d).all())
    if not finite:
        bad = int(np.flatnonzero(~np.isfinite(d))[0])
        raise InputError(
            f"sample {bad}: values too large for the model (the distance is not finite); "
            "send the features on their usual scale"
        )
    return result


class Assigner:
    """What ``POST /assign`` and ``POST /assign/batch`` do, from body bytes to an answer.

    Reads ``holder.current`` once per request (so one request uses one model), decodes and
    validates the body, assigns, records the assignments in the monitor.
    """

    def __init__(
        self, holder: ModelHolder, monitor: AssignmentMonitor, settings: ServiceSettings
    ) -> None:
        self.holder = holder
        self.monitor = monitor
        self.max_batch = settings.max_batch
        self.inline_body_bytes = settings.inline_body_bytes

    async def single(self, body: bytes) -> Answer:
        """Answer an :class:`AssignRequest` body."""
        model = self.holder.current
        if model is None:
            return _not_ready(self.holder)
        try:
            result = _infer(model, decode_features(body, model.input_shape))
        except InputError as exc:
            return _error(422, str(exc), exc.errors)
        self.monitor.record(result.labels, result.soft)
        return 200, pydantic_core.to_json({
            "cluster": int(result.labels[0]),
            "distance": float(result.distances[0]),
            "version": model.version,
        })

    async def batch(self, body: bytes) -> Answer:
        """Answer an :class:`AssignBatchRequest` body (large ones off the event loop)."""
        model = self.holder.current
        if model is None:
            return _not_ready(self.holder)
        try:
            if len(body) <= self.inline_body_bytes:
                result = self._batch(model, body)
            else:
                result = await run_in_threadpool(self._batch, model, body)
        except InputError as exc:
            return _error(422, str(exc), exc.errors)
        self.monitor.record(result.labels, result.soft)
        return 200, pydantic_core.to_json({
            "clusters": result.labels.tolist(),
            "distances": result.distances.tolist(),
            "version": model.version,
        })

    def _batch(self, model: LoadedModel, body: bytes) -> Assignment:
        return _infer(model, decode_items(body, model.input_shape, self.max_batch))


class AssignEndpoint:
    """A plain ASGI endpoint (no dependency injection: this is the latency-critical path).

    Checks the API key, reads the body, calls ``handler`` and times the whole request.
    """

    def __init__(
        self,
        handler: Callable[[bytes], Awaitable[Answer]],
        api_key: bytes | None,
        latency: Any,
    ) -> None:
        self.handler = handler
        self.api_key = api_key
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        if self.api_key is not None:
            given = _header(scope, b"x-api-key")
            if given is None or not hmac.compare_digest(given, self.api_key):
                status, payload = _error(
                    401, "missing or wrong API key (send it in the X-API-Key header)"
                )
                await _send_json(send, status, payload)
                return
        try:
            body = await _read_body(receive)
        except _Disconnected:
            return
        status, payload = await self.handler(body)
        await _send_json(send, status, payload)
        if status == 200:
            self.latency.observe(time.perf_counter() - start)


async def _send_json(send: Send, status: int, payload: bytes) -> None:
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# --------------------------------------------------------------------------- OpenAPI
DESCRIPTION = """
Assigns points to the nearest centroid of the latest model snapshot trained online by the
oclust worker, hot-reloading new snapshots, and exports collapse/drift metrics.

Errors: 401 missing or wrong `X-API-Key` (when the server has one), 413 body too large,
422 invalid input (the `detail` says what), 503 no snapshot loaded yet.
"""

_ERRORS: dict[str, tuple[str, type]] = {
    "401": ("missing or wrong X-API-Key (only when the server has an API key)", ErrorResponse),
    "413": ("request body over the size limit (OCLUST_MAX_BODY_BYTES)", ErrorResponse),
    "422": ("invalid input; `detail` says what is wrong", ErrorResponse),
    "503": ("no snapshot loaded yet; `reason` says why", NotReadyResponse),
}


def _ref(model: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _assign_operation(
    summary: str, description: str, request: type, response: type, secured: bool
) -> dict[str, Any]:
    responses = {"200": {"description": "assigned", "content": {JSON: {"schema": _ref(response)}}}}
    for code, (text, model) in _ERRORS.items():
        responses[code] = {"description": text, "content": {JSON: {"schema": _ref(model)}}}
    op: dict[str, Any] = {
        "summary": summary,
        "description": description,
        "operationId": summary.lower().replace(" ", "_"),
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref(request)}}},
        "responses": responses,
    }
    if secured:
        op["security"] = [{"APIKeyHeader": []}]
    return op


def _install_openapi(app: FastAPI, secured: bool) -> None:
    """OpenAPI for the FastAPI routes plus the two plain ASGI assign endpoints."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (AssignRequest, AssignBatchRequest, AssignResponse, AssignBatchResponse,
                      ErrorResponse, NotReadyResponse):
            s = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(s.pop("$defs", {}))
            schemas[model.__name__] = s
        if secured:
            schema["components"]["securitySchemes"] = {
                "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            }
        paths = {
            "/assign": {"post": _assign_operation(
                "Assign one sample",
                "Nearest centroid of one sample, its squared latent distance and the version "
                "of the snapshot that answered.",
                AssignRequest, AssignResponse, secured,
            )},
            "/assign/batch": {"post": _assign_operation(
                "Assign a batch",
                "Nearest centroids of several samples of the same shape, in request order, "
                "all answered by one snapshot version. At most OCLUST_MAX_BATCH items.",
                AssignBatchRequest, AssignBatchResponse, secured,
            )},
        }
        schema["paths"] = {**paths, **schema.get("paths", {})}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# --------------------------------------------------------------------------- the app
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
    app.add_middleware(LimitsMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    _install_openapi(app, secured=key is not None)

    # The assign endpoints are plain ASGI routes, matched first (documented by the custom
    # OpenAPI above): FastAPI's dependency machinery would cost a sizeable share of a request.
    assigner = Assigner(holder, monitor, settings)
    app.router.routes[:0] = [
        Route("/assign", AssignEndpoint(assigner.single, key, metrics.latency_assign),
              methods=["POST"], include_in_schema=False),
        Route("/assign/batch", AssignEndpoint(assigner.batch, key, metrics.latency_batch),
              methods=["POST"], include_in_schema=False),
    ]

    @app.get(
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
            return Response(_not_ready(holder)[1], status_code=503, media_type=JSON)
        return Response(model.manifest_json, media_type=JSON)

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: 200 once a snapshot is loaded, 503 with the reason before",
        response_model=NotReadyResponse,
        responses={503: {"model": NotReadyResponse, "description": "no snapshot loaded yet"}},
    )
    async def readyz() -> Response:
        model = holder.current
        if model is None:
            return Response(_not_ready(holder)[1], status_code=503, media_type=JSON)
        payload = {"status": "ready", "reason": None, "version": model.version}
        return Response(pydantic_core.to_json(payload), media_type=JSON)

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)",
             response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats", summary="Live collapse and drift statistics", response_model=StatsResponse)
    async def stats() -> Response:
        return Response(pydantic_core.to_json(_stats(holder, monitor)), media_type=JSON)

    @app.get("/", summary="The live page: cluster shares, collapse metrics, a form for /assign",
             response_class=HTMLResponse)
    async def live_page() -> HTMLResponse:
        return HTMLResponse(_live_page())

    return app


@functools.cache
def _live_page() -> bytes:
    """The self-contained live page (no CDN: it polls /stats and /model)."""
    return resources.files("service").joinpath("static", "index.html").read_bytes()


def _stats(holder: ModelHolder, monitor: AssignmentMonitor) -> dict[str, Any]:
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
