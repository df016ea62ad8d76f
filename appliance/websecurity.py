"""TLS and basic auth for the cart's two web endpoints: the ward page (appliance/display/server.py) and
the metrics (appliance/ops/metrics_http.py). Both are off the network by default (loopback); on a ward
or monitoring network each can serve HTTPS and ask for a user and password.

Sockets are accepted plain and the TLS handshake runs where the request is handled (its own thread for
the ward page, the one serving thread for metrics), within the request's time limit: a client that
connects and never speaks holds up no accept loop.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import logging
import socket
import socketserver
import ssl
import threading
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 10.0


def server_context(cert_file: Path, key_file: Path, what: str) -> ssl.SSLContext:
    """A server's TLS context (TLS 1.2 or later) from a PEM certificate (chain) and its key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what}.tls: cannot load {cert_file} / {key_file}: {exc}") from exc
    return context


class TlsServerMixin(socketserver.BaseServer):
    """For a socketserver server (the DICOM receiver's too: appliance/dicomnet/tls_server.py): with
    `tls_context` set, TLS on every connection, the handshake done in finish_request (the request's own
    thread when the server is threading) within HANDSHAKE_SECONDS; server_close() cuts the handshakes
    still waiting, so a stop never waits for a client that connected and said nothing."""

    tls_context: ssl.SSLContext | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before the base class binds: a failed bind calls server_close(), which reads them.
        self._shaking: set[ssl.SSLSocket] = set()
        self._shaking_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[Any, Any]:
        request, address = super().get_request()
        if self.tls_context is None:
            return request, address
        return self.tls_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False), address

    def handshake_failed(self, client_address: Any, exc: OSError) -> None:
        log.debug("TLS handshake with %s not completed: %s", client_address, exc)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            timeout = request.gettimeout()
            with self._shaking_lock:
                self._shaking.add(request)
            try:
                request.settimeout(HANDSHAKE_SECONDS)
                request.do_handshake()
                request.settimeout(timeout)
            except OSError as exc:  # not TLS, a timeout, a reset, cut at stop: this client only
                self.handshake_failed(client_address, exc)
                self.shutdown_request(request)
                return
            finally:
                with self._shaking_lock:
                    self._shaking.discard(request)
        super().finish_request(request, client_address)

    def server_close(self) -> None:
        with self._shaking_lock:
            for request in self._shaking:
                with contextlib.suppress(OSError):
                    request.shutdown(socket.SHUT_RDWR)
        super().server_close()


def credentials_match(header: str, username: str, password: str) -> bool:
    """Whether an Authorization header carries these basic-auth credentials (constant time)."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, colon, given = base64.b64decode(token.strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return False
    # Both compared every time, so the answer's timing does not tell a right user from a wrong one.
    user_ok = hmac.compare_digest(user, username.encode())
    password_ok = hmac.compare_digest(given, password.encode())
    return bool(colon) and user_ok and password_ok


def challenge(realm: str) -> str:
    """The WWW-Authenticate value of a 401."""
    return f'Basic realm="{realm}", charset="UTF-8"'


def off_loopback(host: str) -> bool:
    """Whether a server bound to `host` can be reached from other machines."""
    try:
        infos = socket.getaddrinfo(host or "0.0.0.0", None)
    except OSError:
        return True
    return not all(str(info[4][0]) == "::1" or str(info[4][0]).startswith("127.") for info in infos)
