"""Fixtures for the display tests: a real Mosquitto with a WebSockets listener, the ACL the product
uses (the display may read everything and write only acknowledgements), the display server, Chromium."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
    server = make_server(
        "127.0.0.1",
        0,
        f"ws://127.0.0.1:{broker.ws_port}",
        username=DISPLAY_AUTH[0],
        password=DISPLAY_AUTH[1],
        display_name="test-display",
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    w = Ward(broker, f"http://127.0.0.1:{server.server_address[1]}/")
    yield w
    for c in w.carts:
        c.kill()
    server.shutdown()
    server.server_close()
