"""A stand-in cart publisher, run as its own process so a test can SIGKILL it and see its last will.

It publishes what the appliance publishes, with the appliance's payload classes: a retained online
DeviceStatus (last will: a retained offline one), then for every Result JSON line on stdin the result
(QoS 1) and the retained latest/<bed>. It prints `online` and `published <message_id>` once acknowledged.
Usage: python cart_process.py HOST PORT PREFIX SITE DEVICE LOCATION [USER PASSWORD]
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from appliance.result import DeviceStatus, Result


def main(argv: list[str]) -> int:
    host, port, prefix, site, device, location, *auth = argv
    base = f"{prefix}/{site}/{device}"
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def status(state: str, reason: str | None = None) -> str:
        payload = DeviceStatus(
            state=state, site=site, device_id=device, location=location, since=since, reason=reason
        )
        return payload.model_dump_json(by_alias=True)

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"cart-{site}-{device}", protocol=mqtt.MQTTv311
    )
    if auth:
        client.username_pw_set(auth[0], auth[1])
    client.will_set(f"{base}/status", status("offline", "connection lost"), qos=1, retain=True)
    client.connect(host, int(port), keepalive=5)
    client.loop_start()
    client.publish(f"{base}/status", status("online"), qos=1, retain=True).wait_for_publish(10)
    print("online", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        result = Result.model_validate_json(line)
        body = result.to_json()
        infos = [
            client.publish(f"{base}/result", body, qos=1),
            client.publish(f"{base}/latest/{result.location}", body, qos=1, retain=True),
        ]
        for info in infos:
            info.wait_for_publish(10)
        print(f"published {result.message_id}", flush=True)
    # stdin closed: a clean shutdown says so itself instead of leaving it to the will.
    client.publish(f"{base}/status", status("offline", "stopped"), qos=1, retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
