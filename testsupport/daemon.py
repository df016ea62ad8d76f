"""Run the real daemon (`cxr-appliance run`) in a subprocess, with a real sd_notify socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from testsupport.mosquitto import Broker, Subscriber, unique_by_message_id

REPO = Path(__file__).resolve().parents[1]
SITE, DEVICE = "ward-7", "cart-1"
RESULT_TOPIC = f"cxr/{SITE}/{DEVICE}/result"
STATUS_TOPIC = f"cxr/{SITE}/{DEVICE}/status"


def results(sub: Subscriber) -> list[dict[str, Any]]:
    """Results received so far, decoded, one per message id (at-least-once delivery may repeat one)."""
    return unique_by_message_id(sub.on_topic(RESULT_TOPIC))


def wait_results(sub: Subscriber, count: int, timeout: float) -> list[dict[str, Any]]:
    sub.wait_for(lambda _msgs: len(results(sub)) >= count, timeout)
    return results(sub)


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class DaemonProcess:
    """The appliance as systemd would run it: READY/WATCHDOG/STOPPING arrive on `notify_socket`."""

    def __init__(self, workdir: Path, broker: Broker | None, model: Path, **overrides: Any) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.inbox = workdir / "inbox"
        self.spool = workdir / "spool"
        config: dict[str, Any] = {
            "device": {"site": SITE, "device_id": DEVICE, "location": "bed-3"},
            "ingest": {
                "watch": str(self.inbox),
                "spool": str(self.spool),
                "stable_seconds": 0.5,
                "poll_seconds": 0.3,
            },
            "inference": {"model": str(model), "backend": "onnxruntime", "max_batch": 4},
            "mqtt": {"host": broker.host, "port": broker.port, "reconnect_max_seconds": 1.0}
            if broker
            else {"enabled": False},
            "privacy": {"salt_file": str(workdir / "salt")},
            "journal": {"path": str(workdir / "journal.sqlite3")},
            # Off unless a test asks: several daemons of one test run would compete for port 9108.
            "metrics": {"enabled": False},
        }
        for section, values in overrides.items():
            config.setdefault(section, {}).update(values)
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify_path = workdir / "notify.sock"
        self.notifications: list[str] = []

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        self.notify_path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.sock.settimeout(0.2)
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.notify_path),
            "WATCHDOG_USEC": "2000000",  # as systemd sets it for WatchdogSec=2
            "PYTHONUNBUFFERED": "1",
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "run", "--config", str(self.config_path)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not self.wait_notification("READY=1", timeout):
            raise AssertionError(f"daemon never said READY=1; log:\n{self.log()}")
        return self

    def wait_notification(self, line: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None and line not in self.notifications:
                self._drain()
                return line in self.notifications
            self._drain()
            if line in self.notifications:
                return True
        return False

    def _drain(self) -> None:
        try:
            while True:
                data = self.sock.recv(4096).decode()
                self.notifications.extend(data.splitlines())
        except (TimeoutError, BlockingIOError, OSError):
            pass

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.sock.close()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._drain()
        self.sock.close()
        return code

    def peak_rss_kb(self) -> int | None:
        """The running daemon's peak resident memory (VmHWM) in kB; None when it is not running."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def spool_files(self, state: str) -> list[Path]:
        folder = self.spool / state
        return (
            sorted(p for p in folder.iterdir() if not p.name.endswith((".json", ".txt")))
            if folder.is_dir()
            else []
        )
