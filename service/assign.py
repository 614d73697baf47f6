"""The raw ASGI assign endpoints, ``POST /assign`` and ``POST /assign/batch``.

These are the latency-critical path: plain ASGI callables (no dependency injection), matched
before FastAPI's routes. :class:`Assigner` turns body bytes into an answer (decode, validate,
assign, record in the monitor); :class:`AssignEndpoint` does the HTTP part around it (Content-Type
check, body read under a deadline, timing). Errors are 4xx with a message, never 5xx.

The success path stays raw ASGI: two headers and the body are read straight from the scope and
``receive``, and the answer is two ``send`` calls. Starlette's ``Headers``, ``Request.body()``
and ``Response`` cost about 10 µs of CPU per request here, some 15% of an in-process single-point
request; error answers, off that path, are Starlette ``Response`` objects.

Example:
    >>> import asyncio, httpx
    >>> from starlette.routing import Route, Router
    >>> from oclust.service.loader import ModelHolder
    >>> from oclust.service.monitor import AssignmentMonitor
    >>> from oclust.service.settings import ServiceSettings
    >>> holder = ModelHolder()
    >>> assigner = Assigner(holder, AssignmentMonitor(), ServiceSettings())
    >>> class Latency:
    ...     def observe(self, seconds: float) -> None: ...
    >>> app = Router([Route("/assign", AssignEndpoint(assigner.single, Latency()))])
    >>> async def post(content_type: str) -> tuple[int, str]:
    ...     transport = httpx.ASGITransport(app=app)
    ...     async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
    ...         r = await client.post("/assign", content=b"{}",
    ...                               headers={"content-type": content_type})
    ...         return r.status_code, r.json().get("detail") or r.json()["reason"]
    >>> asyncio.run(post("text/plain"))[0]
    415
    >>> asyncio.run(post("application/json"))
    (503, 'no snapshot loaded yet')
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pydantic_core
from fastapi.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from oclust.service.decoding import (
    BodyTooLarge,
    InputError,
    decode_binary,
    decode_features,
    decode_items,
)
from oclust.service.loader import Assignment, LoadedModel, ModelHolder
from oclust.service.middleware import json_response
from oclust.service.monitor import AssignmentMonitor
from oclust.service.settings import ServiceSettings

__all__ = ["BINARY", "JSON", "AssignEndpoint", "Assigner", "not_ready"]

JSON = "application/json"
BINARY = "application/octet-stream"
POST_TYPES = (JSON.encode(), BINARY.encode())
Answer = tuple[int, bytes]  # HTTP status, JSON body
RawHeaders = list[tuple[bytes, bytes]]
Handler = Callable[[bytes, bool, bool], Awaitable["Answer | tuple[int, bytes, RawHeaders]"]]


def _error(status: int, detail: str, errors: list[dict[str, Any]] | None = None) -> Answer:
    body: dict[str, Any] = {"detail": detail}
    if errors:
        body["errors"] = errors
    return status, pydantic_core.to_json(body)


def not_ready(holder: ModelHolder) -> Answer:
    """503 and why no snapshot is served yet."""
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
        """Answer an :class:`~oclust.service.schemas.AssignRequest` body (or one raw float32
        sample)."""
        model = self.holder.current
        if model is None:
            return not_ready(self.holder)

        def work() -> Assignment:
            if binary:
                return _infer(model, decode_binary(body, model.input_shape, 1, self.max_abs,
                                                   single=True))
            return _infer(model, decode_features(body, model.input_shape, self.max_abs))

        try:
            result = await self._run(work, len(body))
        except InputError as exc:
            return _error(413 if isinstance(exc, BodyTooLarge) else 422, str(exc), exc.errors)
        self.monitor.record(result.labels, result.soft, result.latents)
        return 200, pydantic_core.to_json({
            "cluster": int(result.labels[0]),
            "distance": float(result.distances[0]),
            "version": model.version,
        })

    async def batch(
        self, body: bytes, binary: bool, accept_binary: bool
    ) -> Answer | tuple[int, bytes, RawHeaders]:
        """Answer an :class:`~oclust.service.schemas.AssignBatchRequest` body or a raw float32 batch
        (JSON or binary)."""
        model = self.holder.current
        if model is None:
            return not_ready(self.holder)
        decode = decode_binary if binary else decode_items

        def work() -> Assignment:
            return _infer(model, decode(body, model.input_shape, self.max_batch, self.max_abs))

        try:
            result = await self._run(work, len(body))
        except InputError as exc:
            return _error(413 if isinstance(exc, BodyTooLarge) else 422, str(exc), exc.errors)
        self.monitor.record(result.labels, result.soft, result.latents)
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


class _Disconnected(Exception):
    """The client went away before its body was read."""


# The hot path reads its two headers and its body straight from ASGI: Starlette's ``Headers``
# and ``Request.body()`` cost a measurable share of a single-point request (see the module
# docstring); everything off that path (errors, middleware, the GET routes) uses Starlette.
def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


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
        """The whole body; :class:`TimeoutError` past the deadline, :class:`_Disconnected`."""
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
    the whole request. The API key is checked by
    :class:`~oclust.service.middleware.LimitsMiddleware`.
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
            await json_response(*_error_body(
                415, f"unsupported Content-Type {shown!r}: send application/json "
                "(or application/octet-stream for raw float32 samples)"))(scope, receive, send)
            return
        try:
            body = await self.deadlines.read(receive)
        except _Disconnected:
            return
        except TimeoutError:
            await json_response(*_error_body(
                408, f"request body not received within {self.body_timeout:g} s"))(
                scope, receive, send)
            return
        accept_binary = BINARY.encode() in (_header(scope, b"accept") or b"")
        answer = await self.handler(body, kind == POST_TYPES[1], accept_binary)
        await _send(send, *answer)
        if answer[0] == 200:
            self.latency.observe(time.perf_counter() - start)


def _error_body(status: int, detail: str) -> tuple[int, dict[str, Any]]:
    return status, {"detail": detail}


async def _send(send: Send, status: int, payload: bytes, headers: RawHeaders | None = None) -> None:
    """The answer, written straight to ASGI (the hot path: no Response object)."""
    head = [*(headers or [(b"content-type", b"application/json")]),
            (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": payload})
