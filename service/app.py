"""The FastAPI assignment service: POST /assign, /assign/batch, the manifest, health, metrics.

``create_app(settings, holder)`` needs only ``model`` and a :class:`~service.loader.ModelHolder`;
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
  ``GET /stats`` the live collapse/drift numbers as JSON · ``GET /docs`` OpenAPI.

Client mistakes get 4xx with a message, never 5xx: bad JSON, NaN/inf, wrong shapes, non-numbers,
features beyond ``max_abs_feature`` (``out_of_range``), empty or missing fields and oversized
batches → 422; bodies over ``max_body_bytes`` → 413 (by Content-Length, or counted while
streaming); a POST whose Content-Type is neither JSON nor octet-stream → 415 (no cross-site form
posts); a body not received within ``body_timeout`` → 408; a wrong or missing API key (when one
is set) → 401, on /assign* and on /model, /stats and /metrics unless they are configured open; no
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

import asyncio
import contextlib
import functools
import hmac
import math
import platform
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
    Gauge,
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
    BodyTooLarge,
    ErrorResponse,
    InputError,
    NotReadyResponse,
    StatsResponse,
    decode_binary,
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
BINARY = "application/octet-stream"
POST_TYPES = (JSON.encode(), BINARY.encode())
Answer = tuple[int, bytes]  # HTTP status, JSON body
Headers = list[tuple[bytes, bytes]]
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
        yield gauge("oclust_drift_js_nats", "Jensen-Shannon divergence of the window vs the "
                    "previous window (nats).", s.drift_js)
        model = self.holder.current
        yield gauge("oclust_snapshot_version", "Snapshot version being served.",
                    None if model is None else model.version)
        age = None
        if model is not None and model.created_at is not None:
            age = max(0.0, time.time() - model.created_at)
        yield gauge("oclust_snapshot_age_seconds", "Seconds since the served snapshot was made.",
                    age)
        yield gauge("oclust_snapshot_created_timestamp_seconds",
                    "Unix time the served snapshot was made.",
                    None if model is None else model.created_at)
        yield gauge("oclust_snapshot_fallback", "1 when the served snapshot is not the version "
                    "the store points at (that one cannot be loaded; see /readyz).",
                    1.0 if self.holder.fallback else 0.0)
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
        self.latency_assign = self.latency.labels("/assign")  # same labels as the counter
        self.latency_batch = self.latency.labels("/assign/batch")
        Gauge("oclust_build_info", "Always 1; the labels name the build.",
              ["version", "python"], registry=self.registry).labels(
            _package_version(), platform.python_version()).set(1)
        self.requests = Counter(
            "oclust_http_requests",
            "HTTP requests by endpoint and status class.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, str], Any] = {}

    def count_request(self, endpoint: str, status: int) -> None:
        """Count one answered request (status as 2xx/4xx/5xx; a client disconnect is 499)."""
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
    """Pure ASGI middleware: API key, body-size limit (413) and per-endpoint request counting.

    The limit is checked against Content-Length before the app runs and against the bytes
    actually received while the body streams in (chunked uploads, lying headers). Paths in
    ``protected`` need the API key (when there is one). A request whose client went away before
    any answer is counted as 499, not as a server error.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        metrics: ServiceMetrics,
        api_key: bytes | None = None,
        protected: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.api_key = api_key
        self.protected = protected

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
        disconnected = False
        if (self.api_key is not None and path in self.protected
                and not _authorized(scope, self.api_key)):
            await _respond(send_wrapper, 401, {
                "detail": "missing or wrong API key (send it in the X-API-Key header)"})
        elif length is not None and length > self.max_body_bytes:
            await self._too_large(send_wrapper, f"{length} bytes declared")
        elif length == -1:
            await _respond(send_wrapper, 400, {"detail": "invalid Content-Length header"})
        else:
            received = 0

            async def receive_wrapper() -> Message:
                nonlocal received, disconnected
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected = True
                elif message["type"] == "http.request":
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
                self.metrics.count_request(endpoint, 499 if disconnected else 500)
                raise
        if not started and disconnected:
            status = 499  # nginx's "client closed request": the client's doing, not ours
        self.metrics.count_request(endpoint, status)

    async def _too_large(self, send: Send, what: str) -> None:
        detail = f"request body too large ({what}; the limit is {self.max_body_bytes} bytes)"
        await _respond(send, 413, {"detail": detail})


def _authorized(scope: Scope, key: bytes) -> bool:
    """The request carries ``key`` as ``X-API-Key`` or ``Authorization: Bearer``."""
    given = _header(scope, b"x-api-key")
    if given is None:
        auth = _header(scope, b"authorization") or b""
        scheme, _, token = auth.partition(b" ")
        given = token.strip() if scheme.lower() == b"bearer" else None
    return given is not None and hmac.compare_digest(given, key)


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


@functools.cache
def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("oclust")
    except PackageNotFoundError:
        return "unknown"


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
    validates the body (bodies over ``inline_body_bytes`` in a worker thread, so the event loop
    stays free), assigns, records the assignments in the monitor.
    """

    def __init__(
        self, holder: ModelHolder, monitor: AssignmentMonitor, settings: ServiceSettings
    ) -> None:
        self.holder = holder
        self.monitor = monitor
        self.max_batch = settings.max_batch
        self.max_abs = settings.max_abs_feature
        self.inline_body_bytes = settings.inline_body_bytes

    async def _run(self, work: Callable[[], Assignment], size: int) -> Assignment:
        if size <= self.inline_body_bytes:
            return work()
        return await run_in_threadpool(work)

    async def single(self, body: bytes, binary: bool, _accept_binary: bool) -> Answer:
        """Answer an :class:`AssignRequest` body (or one raw float32 sample)."""
        model = self.holder.current
        if model is None:
            return _not_ready(self.holder)

        def work() -> Assignment:
            if binary:
                return _infer(model, decode_binary(body, model.input_shape, 1, self.max_abs))
            return _infer(model, decode_features(body, model.input_shape, self.max_abs))

        try:
            result = await self._run(work, len(body))
        except InputError as exc:
            return _error(413 if isinstance(exc, BodyTooLarge) else 422, str(exc), exc.errors)
        self.monitor.record(result.labels, result.soft)
        return 200, pydantic_core.to_json({
            "cluster": int(result.labels[0]),
            "distance": float(result.distances[0]),
            "version": model.version,
        })

    async def batch(
        self, body: bytes, binary: bool, accept_binary: bool
    ) -> Answer | tuple[int, bytes, Headers]:
        """Answer an :class:`AssignBatchRequest` body or a raw float32 batch (JSON or binary)."""
        model = self.holder.current
        if model is None:
            return _not_ready(self.holder)
        decode = decode_binary if binary else decode_items

        def work() -> Assignment:
            return _infer(model, decode(body, model.input_shape, self.max_batch, self.max_abs))

        try:
            result = await self._run(work, len(body))
        except InputError as exc:
            return _error(413 if isinstance(exc, BodyTooLarge) else 422, str(exc), exc.errors)
        self.monitor.record(result.labels, result.soft)
        if accept_binary:
            payload = (result.labels.astype("<i4").tobytes()
                       + result.distances.astype("<f4").tobytes())
            return 200, payload, [(b"content-type", BINARY.encode()),
                                  (b"x-oclust-version", str(model.version).encode()),
                                  (b"x-oclust-count", str(len(result.labels)).encode())]
        return 200, pydantic_core.to_json({
            "clusters": result.labels.tolist(),
            "distances": result.distances.tolist(),
            "version": model.version,
        })


Handler = Callable[[bytes, bool, bool], Awaitable["Answer | tuple[int, bytes, Headers]"]]


class _BodyDeadlines:
    """Body reads with a deadline, enforced by one watchdog task per event loop.

    A timer per request (``asyncio.timeout``) costs about a fifth of a single-point request;
    registering the reading task in a dict costs next to nothing. The watchdog wakes every
    ``min(1 s, timeout / 2)`` and cancels reads past their deadline, which then raise
    :class:`TimeoutError`.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.reading: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.Task[None] | None = None

    async def read(self, receive: Receive) -> bytes:
        task = asyncio.current_task()
        assert task is not None
        watchdog = self._watchdog
        if watchdog is None or watchdog.done() or watchdog.get_loop() is not task.get_loop():
            self._watchdog = task.get_loop().create_task(self._watch())
        self.reading[task] = time.monotonic() + self.timeout
        try:
            return await _read_body(receive)
        except asyncio.CancelledError:
            if task not in self.expired:
                raise
            task.uncancel()
            raise TimeoutError from None
        finally:
            self.reading.pop(task, None)
            self.expired.discard(task)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.timeout / 2))
            now = time.monotonic()
            for task, deadline in list(self.reading.items()):
                if deadline <= now and task not in self.expired:
                    self.expired.add(task)
                    task.cancel()


class AssignEndpoint:
    """A plain ASGI endpoint (no dependency injection: this is the latency-critical path).

    Checks the Content-Type (415 unless JSON or octet-stream), reads the body within
    ``body_timeout`` seconds (else 408), calls ``handler(body, binary_in, binary_out)`` and times
    the whole request. The API key is checked by :class:`LimitsMiddleware`.
    """

    def __init__(self, handler: Handler, latency: Any, body_timeout: float = 30.0) -> None:
        self.handler = handler
        self.latency = latency
        self.body_timeout = body_timeout
        self.deadlines = _BodyDeadlines(body_timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        kind = (_header(scope, b"content-type") or b"").partition(b";")[0].strip().lower()
        if kind not in POST_TYPES:
            shown = kind.decode(errors="replace") or "none"
            await _send_json(send, *_error(
                415, f"unsupported Content-Type {shown!r}: send application/json "
                "(or application/octet-stream for raw float32 samples)"))
            return
        try:
            body = await self.deadlines.read(receive)
        except _Disconnected:
            return
        except TimeoutError:
            await _send_json(send, *_error(
                408, f"request body not received within {self.body_timeout:g} s"))
            return
        accept = _header(scope, b"accept") or b""
        answer = await self.handler(body, kind == POST_TYPES[1], BINARY.encode() in accept)
        await _send_json(send, *answer)
        if answer[0] == 200:
            self.latency.observe(time.perf_counter() - start)


async def _send_json(
    send: Send, status: int, payload: bytes, headers: Headers | None = None
) -> None:
    head = [*(headers or [(b"content-type", b"application/json")]),
            (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": payload})


# --------------------------------------------------------------------------- OpenAPI
DESCRIPTION = """
Assigns points to the nearest centroid of the latest model snapshot trained online by the
oclust worker, hot-reloading new snapshots, and exports collapse/drift metrics.

Errors: 401 missing or wrong `X-API-Key` (when the server has one), 408 body not sent in time,
413 body too large, 415 Content-Type neither `application/json` nor `application/octet-stream`,
422 invalid input (the `detail` says what; features beyond the bound: `out_of_range`),
503 no snapshot loaded yet.

Binary batches: `POST /assign/batch` with `Content-Type: application/octet-stream` takes the
samples as raw little-endian float32 values, row after row (each row is the model's
`input_shape`, see GET /model; the row count is the body length / (4 · prod(input_shape))).
With `Accept: application/octet-stream` the answer is binary too: N little-endian int32
clusters, then N little-endian float32 squared distances; the snapshot version is in the
`X-Oclust-Version` header and N in `X-Oclust-Count`. Either input works with either answer.
"""

_ERRORS: dict[str, tuple[str, type]] = {
    "401": ("missing or wrong X-API-Key (only when the server has an API key)", ErrorResponse),
    "408": ("request body not received in time (OCLUST_BODY_TIMEOUT)", ErrorResponse),
    "413": ("request body over the size limit (OCLUST_MAX_BODY_BYTES)", ErrorResponse),
    "415": ("Content-Type is neither application/json nor application/octet-stream",
            ErrorResponse),
    "422": ("invalid input; `detail` says what is wrong", ErrorResponse),
    "503": ("no snapshot loaded yet; `reason` says why", NotReadyResponse),
}


def _ref(model: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


_RAW_IN = {"schema": {"type": "string", "format": "binary", "description": (
    "raw little-endian float32 samples, row after row (rows = length / (4 * prod(input_shape)))")}}
_RAW_OUT = {"schema": {"type": "string", "format": "binary", "description": (
    "N little-endian int32 clusters, then N little-endian float32 distances; headers "
    "X-Oclust-Version (snapshot version) and X-Oclust-Count (N)")}}


def _assign_operation(
    summary: str, description: str, request: type, response: type, secured: bool, raw: bool
) -> dict[str, Any]:
    ok: dict[str, Any] = {JSON: {"schema": _ref(response)}}
    body: dict[str, Any] = {JSON: {"schema": _ref(request)}}
    if raw:
        ok[BINARY], body[BINARY] = _RAW_OUT, _RAW_IN
    responses = {"200": {"description": "assigned", "content": ok}}
    for code, (text, model) in _ERRORS.items():
        responses[code] = {"description": text, "content": {JSON: {"schema": _ref(model)}}}
    op: dict[str, Any] = {
        "summary": summary,
        "description": description,
        "operationId": summary.lower().replace(" ", "_"),
        "requestBody": {"required": True, "content": body},
        "responses": responses,
    }
    if secured:
        op["security"] = [{"APIKeyHeader": []}]
    return op


def _install_openapi(app: FastAPI, secured: bool, protected: frozenset[str]) -> None:
    """OpenAPI for the FastAPI routes plus the two plain ASGI assign endpoints.

    With an API key, the ``protected`` GET endpoints are marked as secured too.
    """

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
                AssignRequest, AssignResponse, secured, raw=False,
            )},
            "/assign/batch": {"post": _assign_operation(
                "Assign a batch",
                "Nearest centroids of several samples of the same shape, in request order, "
                "all answered by one snapshot version. At most OCLUST_MAX_BATCH items. Also "
                "takes raw float32 rows (application/octet-stream) and answers in binary with "
                "`Accept: application/octet-stream` (format in the API description).",
                AssignBatchRequest, AssignBatchResponse, secured, raw=True,
            )},
        }
        schema["paths"] = {**paths, **schema.get("paths", {})}
        for path in protected if secured else ():
            for op in schema["paths"].get(path, {}).values():
                op["security"] = [{"APIKeyHeader": []}]
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
    protected = {"/assign", "/assign/batch"}
    for path, flag in (("/model", settings.protect_model), ("/stats", settings.protect_stats),
                       ("/metrics", settings.protect_metrics)):
        if flag:
            protected.add(path)
    app.add_middleware(LimitsMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics,
                       api_key=key, protected=frozenset(protected))
    _install_openapi(app, secured=key is not None, protected=frozenset(protected))

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
        summary="Readiness: 200 once a snapshot is loaded (`fallback` says when it is not the "
        "pointed version, which could not be loaded), 503 with the reason before",
        response_model=NotReadyResponse,
        responses={503: {"model": NotReadyResponse, "description": "no snapshot loaded yet"}},
    )
    async def readyz() -> Response:
        model = holder.current
        if model is None:
            return Response(_not_ready(holder)[1], status_code=503, media_type=JSON)
        payload = {"status": "ready", "reason": None, "version": model.version,
                   "fallback": holder.fallback}
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
