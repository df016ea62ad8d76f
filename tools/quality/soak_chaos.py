"""What happens to the daemon during a soak (tools/quality/soak.py): images and fuzz files dropped (or
sent by C-STORE) in random bursts, the daemon and the broker SIGKILLed and restarted at seeded random
moments, an exit we did not cause counted as a crash and restarted, and the daemon's peak RSS noted."""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info

from appliance.dicomnet import safe_uid_name
from appliance.ingest.identity import content_sha256
from testsupport.daemon import DaemonProcess
from testsupport.mosquitto import Broker
from tools.quality.soak_inputs import as_cart_dicom, cart_uid, cstore, send_until_stored
from tools.quality.soak_run import BEDS, Drop, Run


def feed(run: Run, daemon: DaemonProcess, images: list[Path], fuzz_cases: list[tuple[str, bytes]]) -> None:
    """Drop images (and fuzz files, spread among them) into the inbox in random bursts."""
    rng = random.Random(run.args.seed + 1)
    items: list[tuple[str, Any]] = [("image", (i, p)) for i, p in enumerate(images)]
    items += [("fuzz", case) for case in fuzz_cases]
    rng.shuffle(items)
    staging = run.workdir / "staging"
    staging.mkdir(exist_ok=True)
    # Spread the drops over the time the kills take, so that kills land while images are in flight.
    kills = max(run.args.daemon_kills, run.args.broker_kills)
    bursts = max(1, len(items) // 4)  # 4.5 files a burst on average
    pause = max(run.args.feed_pause, kills * sum(run.args.kill_gap) / 2 / bursts * 2)
    position = 0
    while position < len(items):
        burst = rng.randint(1, 8)
        for kind, item in items[position : position + burst]:
            if kind == "image":
                index, source = item
                if index % 3 == 2:
                    name = f"img{index:05d}{source.suffix}"
                    shutil.copyfile(source, staging / name)
                    key = f"sha256:{content_sha256(staging / name)}"
                    (staging / name).rename(daemon.inbox / name)  # same filesystem: atomic
                    run.drops.append(Drop(name, "image", key_prefix=key))
                elif index % 3 == 1 and run.cstore_port:
                    # The network path: the X-ray unit sends it by C-STORE (retrying while the cart is down).
                    name, bed = f"img{index:05d}.dcm", BEDS[index % len(BEDS)]
                    secrets = as_cart_dicom(source, staging / name, bed, index, run.args.seed)
                    uid = str(read_file_meta_info(staging / name).MediaStorageSOPInstanceUID)
                    if send_until_stored(run, staging / name):
                        key = f"sop:{uid}/"
                        run.drops.append(Drop(safe_uid_name(uid) or name, "image", bed, secrets, key))
                else:
                    name, bed = f"img{index:05d}.dcm", BEDS[index % len(BEDS)]
                    secrets = as_cart_dicom(source, daemon.inbox / name, bed, index, run.args.seed)
                    key = f"sop:{cart_uid(run.args.seed, index)}/"
                    run.drops.append(Drop(name, "image", bed, secrets, key))
            else:
                case_name, data = item
                name = f"fuzz{len(run.drops):05d}.dcm"
                if case_name.startswith("net:") and run.cstore_port:
                    (staging / name).write_bytes(data)
                    run.cstore_hostile.append(cstore(run, staging / name))
                else:
                    (daemon.inbox / name).write_bytes(data)
                run.drops.append(Drop(name, "fuzz"))
        position += burst
        time.sleep(rng.uniform(0.0, pause))
    run.feeding_done.set()


def note_rss(run: Run, daemon: DaemonProcess) -> None:
    run.peak_rss_kb = max(run.peak_rss_kb, daemon.peak_rss_kb() or 0)


def kill_daemon_repeatedly(
    run: Run, daemon: DaemonProcess, stop: threading.Event, lock: threading.Lock
) -> None:
    rng = random.Random(run.args.seed + 2)
    while run.daemon_kills < run.args.daemon_kills and not stop.is_set():
        if stop.wait(rng.uniform(*run.args.kill_gap)):
            return
        with lock:
            note_rss(run, daemon)
            daemon.kill()  # SIGKILL: mid-decode, mid-inference, mid-publish or mid-journal-write
            run.daemon_kills += 1
            daemon.start(timeout=120)


def kill_broker_repeatedly(run: Run, broker: Broker, stop: threading.Event) -> None:
    rng = random.Random(run.args.seed + 3)
    while run.broker_kills < run.args.broker_kills and not stop.is_set():
        if stop.wait(rng.uniform(*run.args.kill_gap)):
            return
        broker.kill()
        run.broker_kills += 1
        time.sleep(rng.uniform(0.2, 3.0))  # the ward Wi-Fi is away for a moment
        broker.start()


def watch_daemon(run: Run, daemon: DaemonProcess, stop: threading.Event, lock: threading.Lock) -> None:
    """A daemon that exits without being killed by us crashed: count it, restart it (as systemd would)."""
    while not stop.wait(0.5):
        with lock:
            note_rss(run, daemon)
            if daemon.proc is not None and daemon.proc.poll() is not None:
                run.daemon_crashes += 1
                run.notes.append(f"daemon exited by itself with {daemon.proc.returncode}")
                daemon.sock.close()
                daemon.start(timeout=120)
