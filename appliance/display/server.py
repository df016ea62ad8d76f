"""Serves the ward display: the static page in this folder plus a generated `config.json`.

The page is plain static files, so any web server can host it next to a hand-written config.json;
this one exists so `cxr-appliance display` needs nothing but the standard library. It only serves
files under `directory`, never lists folders, and sends a Content-Security-Policy that lets the page
talk to its own origin and the broker's WebSockets URL only (the ward monitor needs no other network).
On a ward network it serves HTTPS (`display.tls`) and asks for a login (`display.auth`) before any file,
config.json (which holds the broker's display password) included.
"""

from __future__ import annotations

import errno
import json
import socket
import ssl
import sys
import threading
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.errors import UserError
from appliance.websecurity import TlsServerMixin, challenge, credentials_match, off_loopback

DISPLAY_DIR = Path(__file__).resolve().parent
CONFIG_PATH = "/config.json"
# A ward page loads a handful of files; a client that holds a connection open without sending (or a
# flood of them) must not tie up the server: each request has this long, and this many run at once.
REQUEST_TIMEOUT_SECONDS = 10.0
MAX_CONCURRENT_REQUESTS = 16
REALM = "cxr-appliance ward display"
ASSET_SUFFIXES = frozenset({".html", ".js", ".css", ".svg", ".png", ".ico", ".md", ".txt", ".map"})


def _ws_origin(broker_ws_url: str) -> str:
    parts = urlsplit(broker_ws_url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise UserError(
            f"display broker_ws_url {broker_ws_url!r}: must look like ws://host:9001 or wss://host/mqtt"
        )
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


def page_config(
    broker_ws_url: str,
    *,
    topic_prefix: str = "cxr",
    site: str = "+",
    username: str | None = None,
    password: str | None = None,
    display_name: str | None = None,
    silent_after_s: float = 20.0,
) -> dict[str, Any]:
    """What the page reads from config.json. The password is the display account's, which the broker's
    ACL limits to reading results/status and publishing acknowledgements; anyone who can load the page
    can read it, so never give the display the appliance's own account. `silent_after_s`: how long the
    page may be connected without a single cart status before it says that nothing is arriving."""
    _ws_origin(broker_ws_url)
    if not silent_after_s > 0:
        raise UserError(f"display silent_after_s {silent_after_s!r}: must be a positive number of seconds")
    for name, value in (("topic_prefix", topic_prefix), ("site", site)):
        if not value or any(c in value for c in "/#") or (value != "+" and "+" in value):
            raise UserError(f"display {name} {value!r}: must be one topic level (no '/', '#' or '+')")
    return {
        "broker_ws_url": broker_ws_url,
        "topic_prefix": topic_prefix,
        "site": site,
        "username": username,
        "password": password,
        "display_name": display_name or socket.gethostname(),
        "silent_after_s": silent_after_s,
    }


class DisplayHandler(SimpleHTTPRequestHandler):
    """Static files plus config.json; no caching so a reload always picks up a new build or config."""

    config_bytes: bytes = b"{}"
    csp: str = "default-src 'self'"
    timeout = REQUEST_TIMEOUT_SECONDS  # socket timeout per request: a silent client is dropped
    # Host names this server answers to. config.json holds the display account's password: a page
    # from elsewhere that rebinds its own DNS name to this address (DNS rebinding) must not read it.
    allowed_hosts: frozenset[str] = frozenset()
    # display.auth: (user, password) the browser must send (basic auth), for every file, config.json too.
    credentials: tuple[str, str] | None = None

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.allowed_hosts and name.strip("[]") not in self.allowed_hosts:
            self.send_error(HTTPStatus.MISDIRECTED_REQUEST, "Unknown host name (display.allowed_hosts)")
            return False
        if self.credentials is not None and not credentials_match(
            self.headers.get("Authorization") or "", *self.credentials
        ):
            self.send_response(HTTPStatus.UNAUTHORIZED)
            self.send_header("WWW-Authenticate", challenge(REALM))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        return True

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", self.csp)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        super().end_headers()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == CONFIG_PATH:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(self.config_bytes)))
            self.end_headers()
            self.wfile.write(self.config_bytes)
            return
        super().do_GET()

    def send_head(self) -> Any:
        # The package folder also holds this module: serve page assets only (GET and HEAD both come here).
        path = urlsplit(self.path).path
        if path != "/" and Path(path).suffix.lower() not in ASSET_SUFFIXES:
            self.send_error(HTTPStatus.NOT_FOUND, "Not found")
            return None
        return super().send_head()

    def list_directory(self, path: Any) -> None:
        # A ward page has nothing to browse; folder listings would only leak the layout.
        self.send_error(HTTPStatus.NOT_FOUND, "Not found")
        return None

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per asset on every reload would drown the appliance log


class BoundedThreadingHTTPServer(TlsServerMixin, ThreadingHTTPServer):
    """One thread per request, at most MAX_CONCURRENT_REQUESTS at once; beyond that a connection is
    closed at once instead of spawning threads without limit."""

    daemon_threads = True

    def __init__(self, *args: Any, max_concurrent: int = MAX_CONCURRENT_REQUESTS, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(max_concurrent)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def default_allowed_hosts(host: str) -> frozenset[str]:
    """The names a browser may use to reach this server unless configured: loopback, this machine's
    names and the address it listens on."""
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname().lower(), socket.getfqdn().lower()}
    if host not in ("", "0.0.0.0", "::"):
        names.add(host.lower())
    return frozenset(names)


def make_server(
    host: str,
    port: int,
    broker_ws_url: str,
    directory: Path | str = DISPLAY_DIR,
    *,
    allowed_hosts: list[str] | None = None,
    tls: ssl.SSLContext | None = None,
    credentials: tuple[str, str] | None = None,
    **config: Any,
) -> BoundedThreadingHTTPServer:
    """A bound, not yet running server (port 0 picks a free port: see `server.server_address`).
    `config` goes to `page_config` (topic_prefix, site, username, password, display_name, silent_after_s).
    allowed_hosts: the Host names to answer (None: `default_allowed_hosts`); others get 421.
    tls: serve HTTPS; credentials: (user, password) every request must carry (basic auth)."""
    root = Path(directory)
    if not (root / "index.html").is_file():
        raise UserError(f"display directory {root}: no index.html there")
    settings = page_config(broker_ws_url, **config)
    csp = (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; worker-src 'self' blob:; "
        f"connect-src 'self' {_ws_origin(broker_ws_url)}; frame-ancestors 'none'; base-uri 'none'"
    )
    handler = type(
        "BoundDisplayHandler",
        (DisplayHandler,),
        {
            "config_bytes": json.dumps(settings, indent=2).encode("utf-8"),
            "csp": csp,
            "allowed_hosts": frozenset(h.lower() for h in allowed_hosts)
            if allowed_hosts is not None
            else default_allowed_hosts(host),
            "credentials": credentials,
        },
    )
    try:
        server = BoundedThreadingHTTPServer((host, port), partial(handler, directory=str(root)))
        server.tls_context = tls
        return server
    except OSError as exc:
        hint = " (already in use: pick another display.port)" if exc.errno == errno.EADDRINUSE else ""
        raise UserError(f"display: cannot listen on {host}:{port}: {exc.strerror}{hint}") from exc


def serve(
    host: str,
    port: int,
    broker_ws_url: str,
    directory: Path | str = DISPLAY_DIR,
    **config: Any,
) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM via the caller)."""
    server = make_server(host, port, broker_ws_url, directory, **config)
    bound_port = server.server_address[1]
    scheme = "https" if server.tls_context is not None else "http"
    print(
        f"Ward display on {scheme}://{host}:{bound_port}/ (broker {broker_ws_url}). Not for diagnostic use."
    )
    if off_loopback(host) and (server.tls_context is None or config.get("credentials") is None):
        # config.json holds the broker's display password: beyond loopback it wants TLS and a login.
        print(
            "WARNING: the ward page is served beyond this machine without TLS and a login"
            " (display.tls, display.auth): anyone on the network can read its broker password.",
            file=sys.stderr,
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
