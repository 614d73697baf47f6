"""uvicorn settings of ``oclust serve``: read timeouts for headers, idle connections, bodies.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but waits for a request's
headers forever. :class:`HeaderTimeoutProtocol` closes a connection whose request headers are
not complete ``header_timeout`` seconds after the connection opened or the request's first byte
arrived (idle keep-alive connections stay uvicorn's business). The body deadline is the app's
(``body_timeout``, answered with 408).

Example:
    >>> from oclust.service.settings import ServiceSettings
    >>> config = uvicorn_config(object(), ServiceSettings(header_timeout=2))
    >>> config.timeout_keep_alive, config.http.header_timeout
    (5, 2.0)
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import h11
import typer
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from oclust.service.settings import ServiceSettings

__all__ = ["HeaderTimeoutProtocol", "bind_socket", "uvicorn_config"]


class HeaderTimeoutProtocol(H11Protocol):
    """h11 protocol that drops clients too slow to send their request headers."""

    header_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request begun, its headers incomplete
            self._arm()
        else:  # headers complete: the body deadline is the app's
            self._cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _cancel(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _expired(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no request under way: nobody to answer


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a taken port or a bad host is a clear error
    (``typer.BadParameter``: one line, exit 2) before any work, not a crash (uvicorn: exit 3)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise typer.BadParameter(f"cannot listen on {host}: {exc.strerror}",
                                     param_hint="--host") from None
        raise typer.BadParameter(f"cannot listen on {host}:{port}: {exc.strerror}; "
                                 "pick another with --port", param_hint="--port") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def uvicorn_config(app: Any, settings: ServiceSettings) -> uvicorn.Config:
    """The uvicorn configuration ``oclust serve`` runs ``app`` with."""
    protocol = type("Protocol", (HeaderTimeoutProtocol,),
                    {"header_timeout": float(settings.header_timeout)})
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        access_log=settings.access_log, http=protocol,
        timeout_keep_alive=settings.keep_alive_timeout,
    )
