"""Fixtures for the display tests: a real Mosquitto with a WebSockets listener, the password file and ACL
as the product writes them (`cxr-appliance display-account`: the display reads its site and writes only
its own acks and history requests), the display server, Chromium."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance.display.accounts import add, set_password
from appliance.display.server import make_server
from tests.display.browser import Browser, missing_tools
from tests.display.results import Cart
from testsupport.mosquitto import Broker, Subscriber

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
SITE = "ward7"
CART_AUTH = ("cart", "cart-secret")
DISPLAY_AUTH = ("display-test", "display-secret")


def ward_broker(
    broker_factory: Callable[..., Broker],
    folder: Path,
    cart: tuple[str, str] = CART_AUTH,
    cart_topic: str = "cxr/#",
    display: tuple[str, str] = DISPLAY_AUTH,
) -> Broker:
    """A broker with WebSockets reading the files `display-account add` writes for `display` (site ward7),
    beside a cart block; the display's random password is then set to the test's known one."""
    folder.mkdir(parents=True, exist_ok=True)
    passwd, acl = folder / "cxr.passwd", folder / "cxr.acl"
    acl.write_text(f"user {cart[0]}\ntopic readwrite {cart_topic}\n", encoding="utf-8")
    set_password(passwd, *cart)
    add(display[0], SITE, passwd, acl)
    set_password(passwd, *display)
    return broker_factory(password_file=passwd, acl_file=acl, websockets=True)


@contextmanager
def serve_display(
    broker: Broker, display_name: str, auth: tuple[str, str] = DISPLAY_AUTH, **config: Any
) -> Iterator[str]:
    """The ward page (appliance.display.server) in a thread, logged in as the display account; yields its URL.
    `config`: more page settings for config.json (e.g. silent_after_s)."""
    server = make_server(
        "127.0.0.1",
        0,
        f"ws://127.0.0.1:{broker.ws_port}",
        username=auth[0],
        password=auth[1],
        display_name=display_name,
        **config,
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    why = missing_tools()
    if why:
        pytest.skip(why)
    b = Browser(tmp_path_factory.mktemp("chromium") / "drive.log")
    yield b
    b.close()


@dataclass
class Ward:
    broker: Broker
    url: str
    carts: list[Cart] = field(default_factory=list)

    def cart(self, **options: object) -> Cart:
        c = Cart(self.broker, auth=CART_AUTH, **options)  # type: ignore[arg-type]
        self.carts.append(c)
        return c

    def subscriber(self, topics: str) -> Subscriber:
        return Subscriber(
            self.broker, topics, clean_session=True, username=CART_AUTH[0], password=CART_AUTH[1]
        )


@pytest.fixture
def ward(broker_factory: Callable[..., Broker], tmp_path: Path) -> Iterator[Ward]:
    broker = ward_broker(broker_factory, tmp_path / "mosquitto-files")
    with serve_display(broker, "test-display") as url:
        w = Ward(broker, url)
        yield w
        for c in w.carts:
            c.kill()
