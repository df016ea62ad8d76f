"""Fixtures for the display tests: a real Mosquitto with a WebSockets listener, the ACL the product
uses (the display may read everything and write only acknowledgements), the display server, Chromium."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance.display.server import make_server
from tests.display.browser import Browser, missing_tools
from tests.display.results import Cart
from tests.support.mosquitto import Broker, Subscriber

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CART_AUTH = ("cart", "cart-secret")
DISPLAY_AUTH = ("display", "display-secret")
ACL = """\
user cart
topic readwrite cxr/#

user display
topic read cxr/#
topic write cxr/+/+/ack/+
"""


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
def ward(broker_factory: Callable[..., Broker]) -> Iterator[Ward]:
    broker = broker_factory(users=dict([CART_AUTH, DISPLAY_AUTH]), acl=ACL, websockets=True)
    with serve_display(broker, "test-display") as url:
        w = Ward(broker, url)
        yield w
        for c in w.carts:
            c.kill()
