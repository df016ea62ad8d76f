"""appliance.display.server: static files, generated config.json, headers, clear errors."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.display.server import DISPLAY_DIR, MAX_CONCURRENT_REQUESTS, DisplayHandler, make_server
from appliance.errors import UserError

WS = "ws://127.0.0.1:9001"


def get(server: ThreadingHTTPServer, path: str) -> tuple[int, Message, bytes]:
    url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    srv = make_server(
        "127.0.0.1", 0, WS, topic_prefix="hosp", site="ward7", username="display", password="pw"
    )
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_serves_page_and_vendored_client(server: ThreadingHTTPServer) -> None:
    status, headers, body = get(server, "/")
    assert status == 200 and b"Not for diagnostic use" in body
    assert headers["Content-Type"].startswith("text/html")
    status, headers, body = get(server, "/vendor/mqtt.min.js")
    assert status == 200 and "javascript" in headers["Content-Type"]
    assert body == (DISPLAY_DIR / "vendor" / "mqtt.min.js").read_bytes()
    assert (
        (DISPLAY_DIR / "vendor" / "mqtt.LICENSE.md").read_text(encoding="utf-8").startswith("The MIT License")
    )


def test_page_refers_to_no_external_host() -> None:
    for name in ("index.html", "app.js", "style.css"):
        text = (DISPLAY_DIR / name).read_text(encoding="utf-8")
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, (
            name
        )


def test_config_json_carries_broker_topics_and_credentials(server: ThreadingHTTPServer) -> None:
    status, headers, body = get(server, "/config.json?x=1")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    cfg = json.loads(body)
    assert cfg["broker_ws_url"] == WS
    assert (cfg["topic_prefix"], cfg["site"], cfg["username"], cfg["password"]) == (
        "hosp",
        "ward7",
        "display",
        "pw",
    )
    assert cfg["display_name"]
    assert cfg["silent_after_s"] == 20.0  # connected this long with no cart status: "not receiving"


def test_headers_forbid_caching_and_foreign_connections(server: ThreadingHTTPServer) -> None:
    _, headers, _ = get(server, "/app.js")
    assert headers["Cache-Control"] == "no-store"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and f"connect-src 'self' {WS};" in csp


def test_no_listing_and_no_escape_from_the_folder(server: ThreadingHTTPServer) -> None:
    assert get(server, "/vendor/")[0] == 404
    assert get(server, "/../../pyproject.toml")[0] == 404
    assert get(server, "/%2e%2e/server.py")[0] == 404
    # Only page assets are served, not the Python beside them.
    assert get(server, "/server.py")[0] == 404
    assert get(server, "/__init__.py")[0] == 404
    assert get(server, "/nope.js")[0] == 404


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"broker_ws_url": "http://host:9001"}, "must look like ws://"),
        ({"broker_ws_url": WS, "topic_prefix": "a/b"}, "topic_prefix"),
        ({"broker_ws_url": WS, "site": "#"}, "site"),
        ({"broker_ws_url": WS, "silent_after_s": 0}, "silent_after_s"),
    ],
)
def test_bad_settings_are_user_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        make_server("127.0.0.1", 0, **kwargs)


def test_missing_page_folder_and_busy_port_are_user_errors(
    tmp_path: Path, server: ThreadingHTTPServer
) -> None:
    with pytest.raises(UserError, match=r"no index\.html"):
        make_server("127.0.0.1", 0, WS, tmp_path)
    with pytest.raises(UserError, match="already in use"):
        make_server("127.0.0.1", server.server_address[1], WS)


def raw_get(port: int, host_header: str, path: str = "/config.json") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_request_for_another_host_name_gets_no_config(server: ThreadingHTTPServer) -> None:
    """DNS rebinding: a hostile page whose own name now resolves to the display server must not read
    config.json (it holds the display account's password)."""
    port = server.server_address[1]
    refused = raw_get(port, f"attacker.example:{port}")
    assert refused.startswith(b"HTTP/1.0 421") and b'"password"' not in refused
    for name in ("127.0.0.1", "localhost"):
        assert raw_get(port, f"{name}:{port}").startswith(b"HTTP/1.0 200"), name


def test_configured_host_names_replace_the_defaults() -> None:
    srv = make_server("127.0.0.1", 0, WS, allowed_hosts=["ward7-monitor.hospital.example"])
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        port = srv.server_address[1]
        assert raw_get(port, "ward7-monitor.hospital.example").startswith(b"HTTP/1.0 200")
        assert raw_get(port, f"127.0.0.1:{port}").startswith(b"HTTP/1.0 421")
    finally:
        srv.shutdown()
        srv.server_close()


def test_silent_clients_time_out_and_cannot_take_every_thread(
    server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(DisplayHandler, "timeout", 3.0)
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(MAX_CONCURRENT_REQUESTS)]
    try:
        deadline = time.monotonic() + 2.5  # until the server has accepted them all (one per loop turn)
        while server._slots._value and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.05)
        assert server._slots._value == 0  # type: ignore[attr-defined]  # every slot: a silent client
        with pytest.raises((ConnectionError, urllib.error.URLError, TimeoutError, OSError)):
            # One more is closed at once, not given a new thread.
            data = raw_get(port, f"127.0.0.1:{port}")
            if not data:
                raise ConnectionError("closed without a reply")
        time.sleep(3.5)  # the silent ones are dropped after the request timeout
        assert raw_get(port, f"127.0.0.1:{port}").startswith(b"HTTP/1.0 200")
        for conn in idle:
            assert conn.recv(1) == b""  # closed by the server
    finally:
        for conn in idle:
            conn.close()


def test_https_and_a_login_guard_every_file_and_the_broker_password(tmp_path: Path) -> None:
    """Found missing by a review run: the page (and config.json, with the broker's display password) was
    plain HTTP to anyone who asked. With display.tls and display.auth: HTTPS, and a login first."""
    import base64
    import ssl

    from appliance.websecurity import server_context
    from testsupport.mosquitto import make_certificates

    certs = make_certificates(tmp_path / "certs")
    srv = make_server(
        "127.0.0.1",
        0,
        "wss://127.0.0.1:9443",
        topic_prefix="hosp",
        site="ward7",
        username="display",
        password="broker-pw",
        tls=server_context(certs.server_cert, certs.server_key, "display"),
        credentials=("ward7", "page-pw"),
    )
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    trusting = ssl.create_default_context(cafile=str(certs.ca))

    def fetch(path: str, login: str | None) -> tuple[int, Message, bytes]:
        request = urllib.request.Request(f"https://127.0.0.1:{port}{path}")
        if login is not None:
            request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=5, context=trusting) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    try:
        silent = socket.create_connection(("127.0.0.1", port))  # never shakes hands: blocks nobody
        for path in ("/", "/config.json", "/app.js"):
            status, headers, body = fetch(path, None)
            assert (
                status == 401 and "Basic" in headers.get("WWW-Authenticate", "") and b"broker-pw" not in body
            )
            assert fetch(path, "ward7:wrong")[0] == 401
        status, _, body = fetch("/config.json", "ward7:page-pw")
        assert status == 200 and json.loads(body)["password"] == "broker-pw"
        assert fetch("/", "ward7:page-pw")[0] == 200
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/config.json", timeout=5)  # plain HTTP
        silent.close()
    finally:
        srv.shutdown()
        srv.server_close()
