"""The service's ASGI middleware: API key (401), body-size limit (413), request counting.

Example:
    >>> import asyncio, httpx
    >>> from starlette.responses import PlainTextResponse
    >>> from oclust.service.loader import ModelHolder
    >>> from oclust.service.metrics import ServiceMetrics
    >>> from oclust.service.monitor import AssignmentMonitor
    >>> metrics = ServiceMetrics(ModelHolder(), AssignmentMonitor())
    >>> app = LimitsMiddleware(PlainTextResponse("ok"), max_body_bytes=4, metrics=metrics)
    >>> async def post(body: bytes) -> int:
    ...     transport = httpx.ASGITransport(app=app)
    ...     async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
    ...         return (await client.post("/assign", content=body)).status_code
    >>> asyncio.run(post(b"1234")), asyncio.run(post(b"12345"))
    (200, 413)
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

import pydantic_core
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from oclust.service.metrics import ServiceMetrics

__all__ = ["ENDPOINTS", "LimitsMiddleware", "json_response"]

ENDPOINTS = frozenset(
    ["/", "/assign", "/assign/batch", "/model", "/healthz", "/readyz", "/metrics", "/stats",
     "/stats/map", "/docs", "/openapi.json"]
)
JSON = "application/json"


def json_response(status: int, body: dict[str, Any]) -> Response:
    """A compact JSON answer (the same bytes the raw endpoints write)."""
    return Response(pydantic_core.to_json(body), status_code=status, media_type=JSON)


class _BodyTooLarge(Exception):
    pass


@dataclass(eq=False)
class LimitsMiddleware:
    """Pure ASGI middleware: API key, body-size limit (413) and per-endpoint request counting.

    The limit is checked against Content-Length before the app runs and against the bytes
    actually received while the body streams in (chunked uploads, lying headers). Paths in
    ``protected`` need the API key (when there is one). A request whose client went away before
    any answer is counted as 499, not as a server error.
    """

    app: ASGIApp
    max_body_bytes: int
    metrics: ServiceMetrics
    api_key: bytes | None = None
    protected: frozenset[str] = frozenset()

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

        headers = Headers(scope=scope)
        length = _content_length(headers)
        disconnected = False
        if (self.api_key is not None and path in self.protected
                and not _authorized(headers, self.api_key)):
            await json_response(401, {
                "detail": "missing or wrong API key (send it in the X-API-Key header)"
            })(scope, receive, send_wrapper)
        elif length is not None and length > self.max_body_bytes:
            await self._too_large(f"{length} bytes declared")(scope, receive, send_wrapper)
        elif length == -1:
            await json_response(400, {"detail": "invalid Content-Length header"})(
                scope, receive, send_wrapper)
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
                await self._too_large(f"over {received} bytes sent")(
                    scope, receive, send_wrapper)
            except Exception:
                self.metrics.count_request(endpoint, 499 if disconnected else 500)
                raise
        if not started and disconnected:
            status = 499  # nginx's "client closed request": the client's doing, not ours
        self.metrics.count_request(endpoint, status)

    def _too_large(self, what: str) -> Response:
        detail = f"request body too large ({what}; the limit is {self.max_body_bytes} bytes)"
        return json_response(413, {"detail": detail})


def _authorized(headers: Headers, key: bytes) -> bool:
    """The request carries ``key`` as ``X-API-Key`` or ``Authorization: Bearer``."""
    given = headers.get("x-api-key")
    if given is None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    # header values are latin-1 decoded bytes: encoding them back gives the bytes sent
    return given is not None and hmac.compare_digest(given.encode("latin-1"), key)


def _content_length(headers: Headers) -> int | None:
    """Declared body length; ``None`` if absent, -1 if malformed."""
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        return -1
    return n if n >= 0 else -1
