"""The main job on a fresh machine: a local broker, the daemon on the bundled model, one real X-ray.

    tools/run.sh            (sets up, then runs this)

Starts Mosquitto on loopback if nothing listens on 1883 (MQTT) / 9001 (WebSockets, for the ward
display), writes var/demo/config.yaml, starts `cxr-appliance run`, drops a real DICOM from
../shared/data/cxr into the watched folder and prints the result message that went out. Then the
daemon keeps watching var/demo/inbox until Ctrl-C (with --once it stops after the demo).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[2]
VAR = REPO / "var" / "demo"
SITE, DEVICE = "demo", "cart-1"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_broker() -> subprocess.Popen[bytes] | None:
    if listening(1883):
        print("==> a broker already listens on 127.0.0.1:1883; using it")
        if not listening(9001):
            print(
                "==> note: nothing listens on 127.0.0.1:9001, so the ward display (WebSockets) cannot reach"
                " that broker; add a `listener 9001 127.0.0.1` + `protocol websockets` to it for the display"
            )
        return None
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    conf = VAR / "mosquitto.conf"
    # Loopback only and anonymous: a demo on this machine. The cart's broker (systemd/mosquitto/cxr.conf)
    # has TLS, passwords and ACLs.
    lines = ["listener 1883 127.0.0.1", "allow_anonymous true"]
    websockets = not listening(9001)
    if websockets:
        lines += ["listener 9001 127.0.0.1", "protocol websockets"]
    if os.geteuid() == 0:
        lines.insert(0, "user root")
    conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log = (VAR / "mosquitto.log").open("ab")
    proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(50):
        if listening(1883):
            extra = (
                "+ WebSockets :9001"
                if websockets
                else "port 9001 is taken: the ward display will not connect"
            )
            print(f"==> started Mosquitto on 127.0.0.1:1883 ({extra}), log {VAR / 'mosquitto.log'}")
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit(f"Mosquitto did not start; see {VAR / 'mosquitto.log'}")


def write_config() -> Path:
    config = {
        "device": {"site": SITE, "device_id": DEVICE, "location": "bed-1"},
        "ingest": {"watch": "inbox", "spool": "spool", "stable_seconds": 1.0},
        "inference": {"model": str(REPO / "engines" / "cxr-lite0" / "manifest.yaml"), "backend": "auto"},
        "mqtt": {"host": "127.0.0.1", "port": 1883},
        "privacy": {"salt_file": "patient-key.salt"},
        "journal": {"path": "journal.sqlite3"},
        "display": {"host": "127.0.0.1", "port": 8080, "broker_ws_url": "ws://127.0.0.1:9001", "site": SITE},
    }
    path = VAR / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def demo_image() -> Path:
    data = Path(os.environ.get("CXR_DATA", REPO.parent / "shared" / "data" / "cxr"))
    dicoms = sorted((data / "dicom").glob("*.dcm"))
    if not dicoms:
        raise SystemExit(f"no real DICOMs under {data}/dicom (set CXR_DATA to the chest X-ray data folder)")
    return dicoms[0]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--once", action="store_true", help="stop after the demo image's result")
    args = parser.parse_args()
    # A fresh demo state each run: the spool remembers every image it has seen (de-duplication), so
    # the same demo image would otherwise be recognised as a repeat and not be read again.
    for stale in ("spool", "inbox", "journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm"):
        path = VAR / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    VAR.mkdir(parents=True, exist_ok=True)
    broker = start_broker()
    try:
        return run_demo(args.once)
    finally:  # whatever happened: the demo's own broker does not outlive it
        if broker is not None:
            stop(broker, 10)


def stop(process: subprocess.Popen[bytes], seconds: float) -> None:
    """SIGTERM, and SIGKILL if it has not ended within `seconds`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(done: Callable[[], bool], daemon: subprocess.Popen[bytes], seconds: float, what: str) -> None:
    """Until `done`, or SystemExit naming `what` when the appliance exits or the time is up."""
    deadline = time.monotonic() + seconds
    while not done():
        if daemon.poll() is not None:
            raise SystemExit(
                f"the appliance stopped (exit {daemon.returncode}) before {what}; see the log above"
            )
        if time.monotonic() > deadline:
            raise SystemExit(f"no {what} within {seconds:.0f} s; see the log above")
        time.sleep(0.2)


def run_demo(once: bool) -> int:
    config = write_config()
    subprocess.run([sys.executable, "-m", "appliance.cli", "doctor", "--config", str(config)], check=False)

    received: list[bytes] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-viewer-{os.getpid()}")

    def on_message(c: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        received.append(bytes(message.payload))

    client.on_message = on_message
    client.connect("127.0.0.1", 1883)
    client.subscribe(f"cxr/{SITE}/{DEVICE}/result", qos=1)
    client.loop_start()

    print(f"==> starting the appliance: cxr-appliance run --config {config}")
    daemon = subprocess.Popen([sys.executable, "-m", "appliance.cli", "run", "--config", str(config)])
    try:
        inbox = VAR / "inbox"
        wait_for(lambda: (VAR / "spool" / "incoming").is_dir() and inbox.is_dir(), daemon, 120, "its start")
        time.sleep(2.0)  # let it finish loading the model and start watching
        image = demo_image()
        target = inbox / f"demo-{int(time.time())}.dcm"
        shutil.copy(image, target)
        print(f"==> copied a real chest X-ray into the watched folder: {image.name} -> {target}")
        wait_for(lambda: bool(received), daemon, 120, "result")
        payload = json.loads(received[0])
        if payload.get("heatmap"):
            payload["heatmap"]["png_base64"] = payload["heatmap"]["png_base64"][:32] + "…"
        print(f"==> the message that went out on cxr/{SITE}/{DEVICE}/result:")
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        print(f"\n==> TEXT: {payload['text']}")
        client.loop_stop()
        client.disconnect()
        if once:
            daemon.send_signal(signal.SIGTERM)
        else:
            print(
                f"\nThe appliance keeps watching {inbox}: drop DICOM/PNG/JPEG files there."
                f"\nWard display: .venv/bin/cxr-appliance display --config {config}  (http://127.0.0.1:8080/)"
                "\nCtrl-C stops the appliance and the demo broker."
            )
        return daemon.wait()
    except KeyboardInterrupt:
        return 130  # as a shell reports Ctrl-C
    finally:
        stop(daemon, 30)


if __name__ == "__main__":
    sys.exit(main())
