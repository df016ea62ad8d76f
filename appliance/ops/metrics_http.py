"""The metrics endpoint's HTTP side: a single-threaded WSGI server, optionally HTTPS and behind basic auth.

One thread serves one request at a time with a socket timeout: a scrape never runs on the processing
loop, and a stalled or hostile client cannot pile up threads.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from appliance.websecurity import TlsServerMixin, challenge, credentials_match

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_SECONDS = 10.0
REALM = "cxr-appliance metrics"

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def basic_auth(app: WsgiApp, username: str, password: str) -> WsgiApp:
    """HTTP basic auth in front of `app`; compared in constant time, 401 with a challenge otherwise."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if credentials_match(environ.get("HTTP_AUTHORIZATION", ""), username, password):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized", [("WWW-Authenticate", challenge(REALM)), ("Content-Type", "text/plain")]
        )
        return [b"authentication required\n"]

    return guarded


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_SECONDS  # a client that stops sending frees the one server thread

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every 15 s would flood the journal; failures show up in Prometheus instead."""


class _Server(TlsServerMixin, WSGIServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or hung up: not worth a traceback in the cart's log.
        log.debug("metrics: request from %s failed", client_address, exc_info=True)


def serve(host: str, port: int, app: WsgiApp, tls: ssl.SSLContext | None = None) -> WSGIServer:
    """A single-threaded WSGI server on host:port (IPv4 or IPv6, whichever the address is); HTTPS with
    `tls` (the handshake within the request's time limit, appliance/websecurity.py)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("_MetricsServer", (_Server,), {"address_family": family, "tls_context": tls})
    return make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
