"""A publisher in its own process, so tests can SIGKILL it like a crashed daemon.

    python -m tests.publish.publisher_proc --port P --outbox PATH --start 0 --count 100 [--flush-and-exit]

Prints `connected` once the broker accepted it and `queued N` after each result is in the outbox.
Without --flush-and-exit it then sleeps until killed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from appliance.config import DeviceConfig, MqttConfig
from appliance.publish import MqttPublisher, Outbox
from testsupport.results import make_result


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--outbox", type=Path, required=True)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--interval", type=float, default=0.0)
    p.add_argument("--flush-and-exit", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    config = MqttConfig(host=args.host, port=args.port, reconnect_max_seconds=0.5, keepalive=5)
    publisher = MqttPublisher(config, DeviceConfig(), Outbox(args.outbox)).start()
    deadline = time.monotonic() + 10
    while not publisher.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    print("connected" if publisher.connected else "not-connected", flush=True)
    for n in range(args.start, args.start + args.count):
        publisher.publish_result(make_result(n, location=f"bed-{n % 3}"))
        print(f"queued {n}", flush=True)
        if args.interval:
            time.sleep(args.interval)
    if args.flush_and_exit:
        ok = publisher.flush(30)
        publisher.close()
        return 0 if ok else 1
    while True:
        time.sleep(60)


if __name__ == "__main__":
    sys.exit(main())
