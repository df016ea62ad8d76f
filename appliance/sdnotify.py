"""A tiny sd_notify client: tell systemd we are ready, alive, stopping, or what we are doing.

No dependency on libsystemd: the protocol is one AF_UNIX datagram of newline-separated KEY=VALUE
lines sent to $NOTIFY_SOCKET (a path, or an abstract socket written '@name'). Outside systemd the
variable is unset and every call is a cheap no-op, so the daemon can call these unconditionally.

The daemon calls `ready()` only after the model is loaded and warmed up, and `watchdog()` from its
processing loop (never from a timer thread: a hung pipeline must stop the pings).
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "ready", "reloading", "status", "stopping", "watchdog", "watchdog_interval"]


def _address(raw: str) -> str | bytes:
    # '@' marks a Linux abstract socket: the kernel name starts with a NUL byte.
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def notify(*lines: str) -> bool:
    """Send `lines` (e.g. "READY=1", "STATUS=warming up") in one datagram.

    Returns True when a message was sent, False when not running under systemd (no NOTIFY_SOCKET).
    A send error is swallowed and reported as False: losing one notification must never kill
    the daemon (systemd's watchdog then decides).
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw or not lines:
        return False
    for line in lines:
        if "\n" in line:
            raise ValueError(f"sd_notify line must not contain a newline: {line!r}")
    payload = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block the processing loop on a notify socket nobody drains (its queue holds ~10 datagrams).
            sock.setblocking(False)
            sock.connect(_address(raw))
            sock.sendall(payload)
    except OSError:
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """READY=1 (with an optional STATUS=): the service leaves 'activating' for 'active'."""
    return notify("READY=1", *([f"STATUS={_one_line(status_text)}"] if status_text else []))


def watchdog() -> bool:
    """WATCHDOG=1: proof of life; must arrive at least every WatchdogSec."""
    return notify("WATCHDOG=1")


def stopping(status_text: str | None = None) -> bool:
    """STOPPING=1: a clean shutdown has begun (systemd then waits TimeoutStopSec, not the watchdog)."""
    return notify("STOPPING=1", *([f"STATUS={_one_line(status_text)}"] if status_text else []))


def reloading() -> bool:
    """RELOADING=1: a SIGHUP reload is in progress; send ready() when done."""
    return notify("RELOADING=1")


def status(text: str) -> bool:
    """STATUS=...: one line shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_interval() -> float | None:
    """Seconds between pings the daemon should keep to (half of WatchdogSec), or None if no watchdog.

    Honours WATCHDOG_PID: the watchdog is meant for that process only (not for children that
    inherited the environment).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    # Half the timeout, as sd_watchdog_enabled(3) recommends, so one late loop turn does not kill us.
    return value / 2_000_000


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())
