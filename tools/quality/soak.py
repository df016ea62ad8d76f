"""Soak the real daemon: images in, broker and daemon killed at random moments, everything counted.

    python -m tools.quality.soak --images 500 --broker-kills 20 --daemon-kills 20 --fuzz 1000 --json OUT.json
    python -m tools.quality.soak --quick --json OUT.json           # the CI size (60 images, 3 + 3 kills, 200 fuzz)

What runs: a real Mosquitto (persistence, autosave), the appliance (`cxr-appliance run`, sd_notify
socket, the bundled engines/cxr-lite0 model or a tiny one), and a ward display: a persistent-session
QoS 1 subscriber on cxr/#. Real chest X-rays from ../shared/data/cxr are dropped into the watched folder
in random bursts: two in three as DICOMs carrying a bed (StationName, four beds) and a made-up patient
name/ID, the rest as the PNG/JPEG they are; half of those DICOMs are sent by C-STORE to the daemon's
DICOM receiver instead (the sender retries until Success, as a modality does while the cart restarts).
Mutated files (testsupport/mutate.py) and hostile codestreams (JPEG/JPEG 2000 headers whose dimensions
lie; half of them by C-STORE, where they must never be answered Success) are dropped in between. Meanwhile the broker is SIGKILLed and restarted and the daemon is SIGKILLed (kill -9) and
restarted, each at seeded random moments. Then everything settles and is checked:

* every image ends in done/ or quarantine/ exactly once (spool), its result in the journal;
* every journal result reached the display (lost = 0) and no image has two message ids
  (duplicates = 0); repeats of one message id (at-least-once redeliveries) are counted separately;
* results of each bed arrive in the order the spool accepted the images;
* `PRAGMA integrity_check` on the journal, the spool and the outbox databases; the outbox drained;
* no patient name or ID (the made-up ones and the real DICOMs') in any payload on any topic;
* the fuzz of the reader (tools/quality/fuzz.py, in a child process that is restarted after a case that
  kills it, so such a case is counted and named, not lost) over `--fuzz` cases: crashes = 0;
* peak RSS of the daemon (VmHWM, the maximum over every incarnation).

The JSON holds at least images, kills, broker_restarts, lost, duplicates, daemon_crashes, fuzz_cases,
fuzz_crashes, quarantined, peak_rss_mb; a Markdown summary is written next to it. Exit 1 on any failure.

Beside this file: soak_run.py (the run's shared state), soak_inputs.py (images, cart DICOMs, C-STORE),
soak_chaos.py (feeding, kills, restarts), soak_fuzz.py, soak_analysis.py (the checks) and
soak_report.py (verdict, Markdown).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from testsupport.daemon import DaemonProcess
from testsupport.mosquitto import Broker, Subscriber, free_port
from testsupport.mutate import Mutator, codestream_lies
from tools.quality.fuzz import data_dir, seed_corpus
from tools.quality.soak_analysis import analyse, settle
from tools.quality.soak_chaos import (
    feed,
    kill_broker_repeatedly,
    kill_daemon_repeatedly,
    note_rss,
    watch_daemon,
)
from tools.quality.soak_fuzz import fuzz_in_children
from tools.quality.soak_inputs import CSTORE_AE, real_dicom_secrets, real_images
from tools.quality.soak_report import markdown, passed
from tools.quality.soak_run import DEVICE, SITE, Run

REPO = Path(__file__).resolve().parents[2]
BUNDLED_MODEL = REPO / "engines" / "cxr-lite0" / "manifest.yaml"
QUICK = {"images": 60, "daemon_kills": 3, "broker_kills": 3, "fuzz": 200, "daemon_fuzz": 20}


def soak(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    workdir = args.workdir
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    run = Run(args, random.Random(args.seed), workdir)
    root = data_dir()
    model = args.model
    if model is None:
        if BUNDLED_MODEL.is_file():
            model = BUNDLED_MODEL
        else:
            from testsupport import tiny_models

            model = tiny_models.xrv_like(workdir / "tiny-model")
            run.notes.append("bundled model missing: a tiny ONNX model was used")
    corpus = seed_corpus(root, workdir / "fuzz-corpus")
    print(f"fuzz: {args.fuzz} cases ...", flush=True)
    fuzz = fuzz_in_children(args.fuzz, args.seed, workdir / "fuzz")
    daemon_fuzz = [(c.name, c.data) for c in Mutator(args.seed + 100).cases(corpus, args.daemon_fuzz)]
    # Hostile codestreams (dimensions that lie), half through the folder, half by C-STORE.
    lies = [(f"{i}:{name}", data) for p in corpus if p.suffix == ".dcm" for i, (name, data) in
            enumerate(codestream_lies(p.read_bytes()))]  # fmt: skip
    daemon_fuzz += [(f"net:{n}" if i % 2 else n, d) for i, (n, d) in enumerate(lies)]
    images = real_images(root, args.images, run.rng)
    secrets = real_dicom_secrets(root)

    broker = Broker(workdir / "broker", autosave=True).start()
    sub = Subscriber(broker, "cxr/#", client_id="soak-ward-display")
    daemon = DaemonProcess(
        workdir / "appliance",
        broker,
        Path(model),
        device={"site": SITE, "device_id": DEVICE, "location": "bed-9"},
        ingest={"min_free_mb": 0},
        logging={"level": "INFO"},
        dicom_net={
            "enabled": True,
            "bind": "127.0.0.1",
            "port": (cstore_port := free_port()),
            "allowed_calling_ae": [CSTORE_AE],
        },
    )
    run.cstore_port = cstore_port
    stop, lock = threading.Event(), threading.Lock()
    ok = False
    try:
        daemon.start(timeout=120)
        print(f"daemon up; feeding {len(images)} images and {len(daemon_fuzz)} fuzz files", flush=True)
        threads = [
            threading.Thread(target=feed, args=(run, daemon, images, daemon_fuzz), name="feed"),
            threading.Thread(target=kill_daemon_repeatedly, args=(run, daemon, stop, lock), name="kill-d"),
            threading.Thread(target=kill_broker_repeatedly, args=(run, broker, stop), name="kill-b"),
            threading.Thread(target=watch_daemon, args=(run, daemon, stop, lock), name="watch"),
        ]
        for t in threads:
            t.start()
        threads[0].join()
        for t in threads[1:3]:  # every kill is made (the feed lasts about as long as they take)
            t.join()
        stop.set()
        threads[3].join()
        broker.start()  # in case the last kill left it down
        ok = settle(run, daemon, sub, timeout=args.settle_timeout)
        if not ok:
            run.notes.append(f"did not settle within {args.settle_timeout:.0f} s")
        time.sleep(2.0)  # a late duplicate would arrive now
        note_rss(run, daemon)
        exit_code = daemon.stop(timeout=60)
        if exit_code != 0:
            run.notes.append(f"daemon exit status {exit_code} at the final SIGTERM")
        checks = analyse(run, daemon, sub, secrets | {s for d in run.drops for s in d.secrets})
    finally:
        stop.set()
        sub.close()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
        broker.stop()
    report: dict[str, Any] = {
        "images": sum(d.kind == "image" for d in run.drops),
        "kills": run.daemon_kills,
        "broker_restarts": run.broker_kills,
        "lost": checks["lost"],
        "duplicates": checks["duplicates"],
        "daemon_crashes": run.daemon_crashes,
        "fuzz_cases": fuzz["cases"],
        "fuzz_crashes": len(fuzz["crashes"]),
        "quarantined": checks["quarantined"],
        "peak_rss_mb": round(run.peak_rss_kb / 1024, 1),
        "daemon_fuzz_files": sum(d.kind == "fuzz" for d in run.drops),
        "cstore_images": run.cstore_sent,
        "cstore_retries": run.cstore_retries,
        "cstore_hostile": len(run.cstore_hostile),
        "cstore_hostile_accepted": sum(status == 0x0000 for status in run.cstore_hostile),
        **{k: v for k, v in checks.items() if k not in ("lost", "duplicates", "quarantined")},
        "fuzz": fuzz,
        "model": str(model),
        "seed": args.seed,
        "settled": ok,
        "elapsed_s": round(time.monotonic() - started, 1),
        "notes": run.notes,
    }
    report["passed"] = passed(report)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--daemon-kills", "--kills", type=int, default=20, dest="daemon_kills")
    parser.add_argument("--broker-kills", "--broker-restarts", type=int, default=20, dest="broker_kills")
    parser.add_argument(
        "--fuzz", type=int, default=1000, help="in-process fuzz cases (tools/quality/fuzz.py)"
    )
    parser.add_argument("--daemon-fuzz", type=int, default=None, help="mutated files dropped into the inbox")
    parser.add_argument("--quick", action="store_true", help="CI size: " + json.dumps(QUICK))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--model", type=Path, help="manifest; default: the bundled cxr-lite0, else a tiny one"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cxr-soak"))
    parser.add_argument("--json", type=Path, default=REPO / "artifacts" / "soak.json")
    parser.add_argument("--feed-pause", type=float, default=0.5, help="least longest pause between bursts")
    parser.add_argument("--kill-gap", type=float, nargs=2, default=(2.0, 8.0), help="seconds between kills")
    parser.add_argument("--settle-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.daemon_fuzz is None:
        args.daemon_fuzz = max(0, args.fuzz // 10)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up broker/daemon on SIGTERM too
    report = soak(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
    args.json.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
