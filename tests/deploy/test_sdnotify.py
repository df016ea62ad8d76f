"""appliance.sdnotify against a real AF_UNIX datagram socket, as systemd's notify socket would be."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import sdnotify

REPO = Path(__file__).resolve().parents[2]


class NotifySocket:
    """The receiving end: like systemd, it asks the kernel for the sender's credentials (SO_PASSCRED)."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(10)

    def receive(self) -> tuple[list[str], int]:
        """(lines of one datagram, sender pid)."""
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("3i", payload[: struct.calcsize("3i")])
        return data.decode().split("\n"), pid

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    sock = NotifySocket(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_ready_watchdog_stopping_arrive_in_order(notify_socket: NotifySocket) -> None:
    assert sdnotify.ready()
    assert sdnotify.watchdog()
    assert sdnotify.status("processing 3 images")
    assert sdnotify.stopping()
    received = [notify_socket.receive()[0] for _ in range(4)]
    assert received == [["READY=1"], ["WATCHDOG=1"], ["STATUS=processing 3 images"], ["STOPPING=1"]]


def test_several_lines_travel_in_one_datagram(notify_socket: NotifySocket) -> None:
    assert sdnotify.ready("model loaded\nand warm")
    lines, pid = notify_socket.receive()
    # A newline inside STATUS would start a new assignment; it is folded into one line.
    assert lines == ["READY=1", "STATUS=model loaded and warm"]
    assert pid == os.getpid()
    with pytest.raises(ValueError, match="newline"):
        sdnotify.notify("STATUS=a\nWATCHDOG=1")


def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"cxr-test-notify-{os.getpid()}"
    sock = NotifySocket(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.watchdog()
        assert sock.receive()[0] == ["WATCHDOG=1"]
    finally:
        sock.close()


def test_the_daemon_process_is_the_sender(notify_socket: NotifySocket) -> None:
    """NotifyAccess=main: systemd only believes messages whose sender pid is the service's main pid."""
    code = "from appliance import sdnotify; sdnotify.ready(); sdnotify.watchdog(); sdnotify.stopping()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    messages = [notify_socket.receive() for _ in range(3)]
    assert proc.wait(timeout=60) == 0
    assert [m[0] for m in messages] == [["READY=1"], ["WATCHDOG=1"], ["STOPPING=1"]]
    assert {m[1] for m in messages} == {proc.pid}


def test_outside_systemd_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready()
    assert not sdnotify.watchdog()
    assert not sdnotify.stopping()


def test_a_vanished_socket_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not sdnotify.watchdog()


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0
    # Inherited by a child: the watchdog belongs to the main process only.
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert sdnotify.watchdog_interval() is None
