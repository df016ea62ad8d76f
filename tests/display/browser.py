"""Python side of drive.mjs: a real headless Chromium (Debian's), driven line by line from pytest."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("drive.mjs")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node") or "/usr/bin/node"
STILL_MS = 300  # click(): how long the target must keep its place


def missing_tools() -> str | None:
    """Why the browser tests cannot run here, or None (CI installs all three)."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found: apt-get install -y chromium"
    if not os.access(NODE, os.X_OK):
        return "node not found: apt-get install -y nodejs npm"
    if not (REPO / "web" / "node_modules" / "playwright-core").is_dir():
        return "web/node_modules missing: cd web && npm ci"
    return None


class BrowserError(AssertionError):
    """A browser step failed (e.g. a selector never appeared); carries the page's console log."""


class Browser:
    def __init__(self, log_file: Path, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._stderr = log_file.open("wb")
        self.proc = subprocess.Popen(
            [NODE, str(DRIVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**os.environ, "CHROMIUM": CHROMIUM},
            cwd=REPO,
        )
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._next = 0
        self.version = self._reply(0)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._replies.put(json.loads(line))
        self._replies.put(None)

    def _reply(self, expected_id: int) -> Any:
        try:
            msg = self._replies.get(timeout=self.timeout)
        except queue.Empty:
            raise BrowserError(f"drive.mjs did not answer within {self.timeout} s") from None
        if msg is None:
            raise BrowserError(f"drive.mjs exited (see {self._stderr.name})")
        assert msg["id"] == expected_id, msg
        if not msg["ok"]:
            raise BrowserError(msg["error"])
        return msg.get("value")

    def call(self, op: str, **args: Any) -> Any:
        self._next += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"id": self._next, "op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()
        return self._reply(self._next)

    def page(
        self,
        name: str,
        url: str,
        width: int = 1920,
        height: int = 1080,
        *,
        record: bool = False,
        reduced_motion: bool = False,
    ) -> Page:
        """A new context + page. `record`: intercept every request (see `Page.requests`), aborting any
        that leaves loopback."""
        self.call(
            "open",
            page=name,
            url=url,
            width=width,
            height=height,
            record=record,
            reducedMotion="reduce" if reduced_motion else "no-preference",
        )
        return Page(self, name)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


class Page:
    """One browser context + page: its own localStorage, like a separate ward monitor."""

    def __init__(self, browser: Browser, name: str) -> None:
        self.browser = browser
        self.name = name

    def _call(self, op: str, **args: Any) -> Any:
        try:
            return self.browser.call(op, page=self.name, **args)
        except BrowserError as exc:
            if op == "logs":
                raise
            raise BrowserError(f"{op} {args}: {exc}\npage log:\n" + "\n".join(self.logs())) from None

    def wait(self, selector: str, state: str = "visible", timeout: float = 15.0) -> None:
        self._call("wait", selector=selector, state=state, timeout=int(timeout * 1000))

    def wait_true(self, expression: str, timeout: float = 15.0) -> None:
        """Wait until a JS expression is truthy in the page."""
        self._call("waitTrue", expression=expression, timeout=int(timeout * 1000))

    def eval(self, expression: str) -> Any:
        return self._call("eval", expression=expression)

    def text(self, selector: str) -> str:
        return str(self.eval(f"document.querySelector({json.dumps(selector)}).textContent"))

    def attr(self, selector: str, name: str) -> str | None:
        value = self.eval(f"document.querySelector({json.dumps(selector)})?.getAttribute({json.dumps(name)})")
        return None if value is None else str(value)

    def count(self, selector: str) -> int:
        return int(self.eval(f"document.querySelectorAll({json.dumps(selector)}).length"))

    def fill(self, selector: str, value: str) -> None:
        self._call("fill", selector=selector, value=value)

    def click(self, selector: str) -> None:
        """A real click, once `selector` has kept its place for STILL_MS: a heatmap or a patient's history
        arriving a moment after the tiles resizes them, and a press aimed at where a tile was before the
        layout moved lands beside it (Playwright checks the target, then presses; the page may move in
        between). That is a press aimed badly, not one lost: the page's own hold covers a press that
        straddles a redraw (test_a_click_survives_a_reading_arriving_between_press_and_release)."""
        place = (
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false;"
            " const b = e.getBoundingClientRect(); const k = [b.x, b.y, b.width, b.height].join();"
            " const w = window.__clickStill; const now = performance.now();"
            " if (!w || w.s !== " + json.dumps(selector) + " || w.k !== k) {"
            " window.__clickStill = { s: " + json.dumps(selector) + ", k, t: now }; return false; }"
            f" return now - w.t >= {STILL_MS}; }})()"
        )
        self.wait_true(place)
        self._call("click", selector=selector)

    def mouse_down(self, selector: str) -> None:
        """The mouse moved onto `selector` and its button pressed (and held until `mouse_up`)."""
        self._call("mouse", action="down", selector=selector)

    def mouse_up(self) -> None:
        self._call("mouse", action="up")

    def press(self, key: str, selector: str | None = None) -> None:
        """A real key press, on `selector` or on whatever has the focus."""
        self._call("press", key=key, selector=selector)

    def focus(self, selector: str) -> None:
        self._call("focus", selector=selector)

    def resize(self, width: int, height: int) -> None:
        self._call("resize", width=width, height=height)

    def requests(self) -> dict[str, list[Any]]:
        """With `record`: {"requests": [{url, type, method}], "sockets": [ws url]} so far."""
        return dict(self._call("requests"))

    def reload(self) -> None:
        self._call("reload")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._call("screenshot", path=str(path))
        return path

    def logs(self) -> list[str]:
        return list(self._call("logs"))

    def errors(self, *, broker_was_down: bool = False) -> list[str]:
        """Page errors, console errors and any request leaving loopback. broker_was_down: the browser's
        own "WebSocket connection … refused" lines while a test had stopped the broker are expected
        (mqtt.js retries every 2 s), not the page's fault."""
        refused = re.compile(
            r"^console\.error: WebSocket connection to 'ws://127\.0\.0\.1:\d+/' failed: .*REFUSED$"
        )
        return [
            line
            for line in self.logs()
            if line.startswith(("pageerror", "console.error", "external-request"))
            and not (broker_was_down and refused.match(line))
        ]

    def assert_clean(self, *, broker_was_down: bool = False) -> None:
        assert self.errors(broker_was_down=broker_was_down) == [], self.logs()

    def close(self) -> None:
        self._call("closePage")
