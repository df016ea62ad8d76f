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
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance.dicomnet import safe_uid_name
from testsupport.daemon import DaemonProcess
from testsupport.dicom_scu import store
from testsupport.mosquitto import Broker, Received, Subscriber, free_port
from testsupport.mutate import Mutator, codestream_lies
from tools.quality.fuzz import data_dir, seed_corpus

REPO = Path(__file__).resolve().parents[2]
BEDS = ("bed-1", "bed-2", "bed-3", "bed-4")
SITE, DEVICE = "ward-7", "cart-1"
RESULT_TOPIC = f"cxr/{SITE}/{DEVICE}/result"
STATUS_TOPIC = f"cxr/{SITE}/{DEVICE}/status"
BUNDLED_MODEL = REPO / "engines" / "cxr-lite0" / "manifest.yaml"
QUICK = {"images": 60, "daemon_kills": 3, "broker_kills": 3, "fuzz": 200, "daemon_fuzz": 20}


@dataclass
class Drop:
    """One file put into the watched folder."""

    name: str
    kind: str  # image | fuzz
    bed: str | None = None
    secrets: tuple[str, ...] = ()


@dataclass
class Run:
    args: argparse.Namespace
    rng: random.Random
    workdir: Path
    drops: list[Drop] = field(default_factory=list)
    daemon_kills: int = 0
    broker_kills: int = 0
    daemon_crashes: int = 0
    peak_rss_kb: int = 0
    notes: list[str] = field(default_factory=list)
    feeding_done: threading.Event = field(default_factory=threading.Event)
    cstore_port: int = 0  # the daemon's DICOM receiver; 0 = images only through the folder
    cstore_sent: int = 0
    cstore_retries: int = 0
    cstore_hostile: list[int | None] = field(default_factory=list)  # statuses for hostile codestreams

    def notes_once(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)


# --- inputs ---------------------------------------------------------------------------------------


def real_images(root: Path, count: int, rng: random.Random) -> list[Path]:
    images = sorted((root / "images").rglob("*.*"))
    if len(images) < count:
        raise SystemExit(f"only {len(images)} images in {root}/images, {count} asked")
    return rng.sample(images, count)


def as_cart_dicom(source: Path, target: Path, bed: str, index: int, seed: int) -> tuple[str, str]:
    """A DX DICOM of the real image, as a cart writes it: the bed in StationName, a (made-up) patient."""
    pixels = np.asarray(Image.open(source).convert("L"))
    patient_name, patient_id = f"SOAK^PATIENT^{seed}X{index:05d}", f"SOAKPID{seed}X{index:05d}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.1.1")  # DX for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"soak/{seed}/{index}"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(target), {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"soak-study/{seed}/{index}"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"soak-series/{seed}/{index}"])
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined, ds.StationName = "DX", "PA", "CHEST", bed
    ds.StudyDate, ds.StudyTime = "20261124", f"{index % 24:02d}0000"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    tmp = target.with_name(f".{target.name}.tmp")  # renamed into place, as a modality's C-STORE SCP does
    ds.save_as(tmp, enforce_file_format=True)
    tmp.rename(target)
    return patient_name, patient_id


CSTORE_AE = "SOAK_XRAY"


def cstore(run: Run, path: Path) -> int | None:
    """One C-STORE of `path`: its status, or None when there was no association or no answer."""
    try:
        statuses = store(run.cstore_port, [path], calling=CSTORE_AE)
    except Exception as exc:  # an association torn down by a kill -9 surfaces in several ways
        run.notes_once(f"C-STORE raised {type(exc).__name__} (daemon being killed)")
        return None
    return statuses[0] if statuses else None


def send_until_stored(run: Run, path: Path, patience: float = 90.0) -> bool:
    """What a modality does: send again until the cart answers Success (it may be down for a kill)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        status = cstore(run, path)
        if status == 0x0000:
            run.cstore_sent += 1
            return True
        run.cstore_retries += 1
        time.sleep(0.5)
    run.notes.append(f"C-STORE of {path.name} not accepted within {patience:.0f} s")
    return False


def real_dicom_secrets(root: Path) -> set[str]:
    out: set[str] = set()
    for path in (root / "dicom").glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out |= {str(v) for v in (ds.get("PatientName"), ds.get("PatientID")) if v not in (None, "")}
    return {s for s in out if len(s) >= 4}  # a 1-3 character "ID" would match any payload by chance


# --- fuzz -----------------------------------------------------------------------------------------


def fuzz_in_children(count: int, seed: int, workdir: Path) -> dict[str, Any]:
    """tools/quality/fuzz.py over cases 0..count-1 in child processes; a case after which the child died
    (abort, segfault, hang past its limit) is a crash, and the next child resumes after it."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "cases.jsonl"
    start, deaths = 0, []
    while start < count:
        options = {"--cases": count, "--seed": seed, "--start": start, "--log": log, "--workdir": workdir}
        proc = subprocess.run(
            [sys.executable, "-m", "tools.quality.fuzz", *(f"{k}={v}" for k, v in options.items())],
            capture_output=True,
            text=True,
        )
        lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        started = [line["start"] for line in lines if "start" in line]
        finished = {line["name"] for line in lines if "status" in line}
        unfinished = [name for name in started if name not in finished]
        if proc.returncode in (0, 1) and not unfinished:
            break
        if not unfinished:  # died before its first case: nothing to resume from
            deaths.append({"name": f"fuzz.py start {start}", "reason": f"exit {proc.returncode}"})
            break
        deaths.append({"name": unfinished[-1], "reason": f"process died ({proc.returncode})"})
        deaths[-1]["detail"] = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else ""
        start = int(unfinished[-1].rsplit("#", 1)[1]) + 1
    outcomes = [line for line in lines if "status" in line]
    reasons = collections.Counter(o["reason"] for o in outcomes if o["status"] == "rejected")
    crashes = [o for o in outcomes if o["status"] == "crash"] + deaths
    slowest: dict[str, Any] = max(outcomes, key=lambda o: o["seconds"], default={"seconds": 0.0, "name": ""})
    return {
        "cases": len(outcomes) + len(deaths),
        "decoded": sum(o["status"] == "decoded" for o in outcomes),
        "rejected": sum(o["status"] == "rejected" for o in outcomes),
        "crashes": [f"{c['name']}: {c['reason']}: {c.get('detail', '')}" for c in crashes],
        "reasons": dict(reasons.most_common()),
        "mutations": dict(
            sorted(collections.Counter(o["mutation"].split("->")[0] for o in outcomes).items())
        ),
        "slowest_s": round(slowest["seconds"], 3),
        "slowest_case": slowest["name"],
        "traced_peak_mb": round(max((o["traced_peak_mb"] for o in outcomes), default=0.0), 1),
    }


# --- the run --------------------------------------------------------------------------------------


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
                    (staging / name).rename(daemon.inbox / name)  # same filesystem: atomic
                    run.drops.append(Drop(name, "image"))
                elif index % 3 == 1 and run.cstore_port:
                    # The network path: the X-ray unit sends it by C-STORE (retrying while the cart is down).
                    name, bed = f"img{index:05d}.dcm", BEDS[index % len(BEDS)]
                    secrets = as_cart_dicom(source, staging / name, bed, index, run.args.seed)
                    uid = str(read_file_meta_info(staging / name).MediaStorageSOPInstanceUID)
                    if send_until_stored(run, staging / name):
                        run.drops.append(Drop(safe_uid_name(uid) or name, "image", bed, secrets))
                else:
                    name, bed = f"img{index:05d}.dcm", BEDS[index % len(BEDS)]
                    secrets = as_cart_dicom(source, daemon.inbox / name, bed, index, run.args.seed)
                    run.drops.append(Drop(name, "image", bed, secrets))
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


def vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def note_rss(run: Run, daemon: DaemonProcess) -> None:
    if daemon.proc is not None and daemon.proc.poll() is None:
        run.peak_rss_kb = max(run.peak_rss_kb, vm_hwm_kb(daemon.proc.pid))


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


# --- checks ---------------------------------------------------------------------------------------


def sqlite_rows(path: Path, query: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def integrity(path: Path) -> str:
    return (
        ", ".join(str(r[0]) for r in sqlite_rows(path, "PRAGMA integrity_check"))
        if path.exists()
        else "missing"
    )


def settle(run: Run, daemon: DaemonProcess, sub: Subscriber, timeout: float) -> bool:
    """Wait until the inbox is empty (truncated files wait out the watcher's timeout), the spool has
    nothing waiting, and every result in the journal reached the display."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = any(p.is_file() for p in daemon.inbox.rglob("*")) or daemon.spool_files("incoming")
        waiting = waiting or daemon.spool_files("processing")
        if not waiting and not missing_results(daemon, sub):
            return True
        time.sleep(1.0)
    return False


def journal_results(daemon: DaemonProcess) -> dict[str, str]:
    """image_id -> message_id of every result in the journal."""
    rows = sqlite_rows(daemon.workdir / "journal.sqlite3", "SELECT image_id, message_id FROM results")
    return {str(a): str(b) for a, b in rows}


def missing_results(daemon: DaemonProcess, sub: Subscriber) -> set[str]:
    got = {m.json()["message_id"] for m in sub.on_topic(RESULT_TOPIC)}
    return set(journal_results(daemon).values()) - got


def analyse(run: Run, daemon: DaemonProcess, sub: Subscriber, secrets: set[str]) -> dict[str, Any]:
    messages: list[Received] = list(sub.messages)
    results = [m.json() for m in messages if m.topic == RESULT_TOPIC]
    journal = journal_results(daemon)
    received_ids = [r["message_id"] for r in results]
    per_image: dict[str, set[str]] = collections.defaultdict(set)
    for r in results:
        per_image[r["image"]["image_id"]].add(r["message_id"])
    spool = daemon.workdir / "journal.sqlite3"  # the appliance's database holds the spool's rows
    items = sqlite_rows(spool, "SELECT seq, image_id, state, original FROM items ORDER BY seq")
    states = collections.Counter(str(r[2]) for r in items)
    # Order per bed: first arrivals of each bed's results must follow the spool's acceptance order.
    seq = {str(r[1]): int(r[0]) for r in items}
    first: dict[str, dict[str, Any]] = {}
    for r in results:
        first.setdefault(r["message_id"], r)
    order_violations = 0
    for bed in {str(r.get("location")) for r in first.values()}:
        seqs = [seq.get(r["image"]["image_id"], -1) for r in first.values() if str(r.get("location")) == bed]
        order_violations += sum(1 for a, b in itertools.pairwise(seqs) if b < a)
    # Every image dropped: exactly one spool row, done or quarantine; exactly one result if done.
    originals = collections.Counter(Path(str(r[3])).name for r in items)
    images = [d for d in run.drops if d.kind == "image"]
    not_accounted = [d.name for d in images if originals[d.name] != 1]
    unfinished = [str(r[1]) for r in items if r[2] not in ("done", "quarantine")]
    quarantine_dir = daemon.spool / "quarantine"
    reasons: collections.Counter[str] = collections.Counter()
    for text in quarantine_dir.glob("*.reason.txt"):
        body = text.read_text(errors="replace")
        reason = next(
            (line.split(":", 1)[1].strip() for line in body.splitlines() if line.startswith("reason")), ""
        )
        reasons[reason or body.splitlines()[0][:60]] += 1
    everything = b"\n".join(m.payload for m in messages)
    leaks = sorted(s for s in secrets if s.encode() in everything)
    outbox = daemon.workdir / "journal.sqlite3"  # and the outbox
    outbox_pending = sqlite_rows(outbox, "SELECT COUNT(*) FROM outbox WHERE state = 'pending'")[0][0]
    statuses = [m.json() for m in messages if m.topic == STATUS_TOPIC]
    return {
        "results": len(set(received_ids)),
        "journal_results": len(journal),
        "lost": len(set(journal.values()) - set(received_ids)),
        "duplicates": sum(1 for ids in per_image.values() if len(ids) > 1),
        "redeliveries": len(received_ids) - len(set(received_ids)),
        "order_violations": order_violations,
        "images_not_accounted": not_accounted[:20],
        "images_not_accounted_count": len(not_accounted),
        "unfinished": len(unfinished),
        "spool_states": dict(states),
        "quarantined": len(list(quarantine_dir.glob("*.reason.txt"))),
        "quarantine_reasons": dict(reasons.most_common()),
        "phi_leaks": leaks,
        "phi_strings_checked": len(secrets),
        "payloads_scanned": len(messages),
        "outbox_pending": int(outbox_pending),
        "integrity": {  # one database (the store) since v2: each name is what it holds
            "journal": integrity(daemon.workdir / "journal.sqlite3"),
            "spool": integrity(spool),
            "outbox": integrity(outbox),
        },
        "status_messages": len(statuses),
        "last_status": statuses[-1] if statuses else None,
    }


# --- main -----------------------------------------------------------------------------------------


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


def passed(r: dict[str, Any]) -> bool:
    return bool(
        r["settled"]
        and r["lost"] == 0
        and r["duplicates"] == 0
        and r["daemon_crashes"] == 0
        and r["fuzz_crashes"] == 0
        and r["order_violations"] == 0
        and r["images_not_accounted_count"] == 0
        and r["unfinished"] == 0
        and not r["phi_leaks"]
        and r["outbox_pending"] == 0
        and r.get("cstore_hostile_accepted", 0) == 0  # Success only for what will be read
        and all(v == "ok" for v in r["integrity"].values())
    )


def markdown(r: dict[str, Any]) -> str:
    rows = [
        ("images dropped", r["images"]),
        ("daemon SIGKILLs survived", r["kills"]),
        ("broker SIGKILLs + restarts survived", r["broker_restarts"]),
        (
            "results delivered (unique message ids)",
            f"{r['results']} of {r['journal_results']} in the journal",
        ),
        ("lost", r["lost"]),
        ("duplicates after de-duplication", r["duplicates"]),
        ("redeliveries of one message id (at-least-once)", r["redeliveries"]),
        ("order violations per bed", r["order_violations"]),
        ("daemon crashes (exits we did not cause)", r["daemon_crashes"]),
        ("fuzz cases through read_image / crashes", f"{r['fuzz_cases']} / {r['fuzz_crashes']}"),
        ("fuzz files through the daemon", r["daemon_fuzz_files"]),
        (
            "images sent by C-STORE (retries while the cart was down)",
            f"{r.get('cstore_images', 0)} ({r.get('cstore_retries', 0)})",
        ),
        (
            "hostile codestreams by C-STORE / answered Success",
            f"{r.get('cstore_hostile', 0)} / {r.get('cstore_hostile_accepted', 0)}",
        ),
        ("quarantined", r["quarantined"]),
        ("payloads scanned for PHI / leaks", f"{r['payloads_scanned']} / {len(r['phi_leaks'])}"),
        ("journal / spool / outbox integrity", " / ".join(r["integrity"].values())),
        ("outbox pending at the end", r["outbox_pending"]),
        ("peak RSS of the daemon", f"{r['peak_rss_mb']} MB"),
        ("elapsed", f"{r['elapsed_s']} s"),
    ]
    lines = [
        f"# Soak: {'PASSED' if r['passed'] else 'FAILED'}",
        "",
        f"Model `{r['model']}`, seed {r['seed']}.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Quarantine reasons",
        "",
        *(f"- {k}: {v}" for k, v in r["quarantine_reasons"].items()),
        "",
        "## Fuzz of read_image: refusal reasons",
        "",
        *(f"- {k}: {v}" for k, v in r["fuzz"]["reasons"].items()),
    ]
    if r["notes"]:
        lines += ["", "## Notes", "", *(f"- {n}" for n in r["notes"])]
    return "\n".join(lines) + "\n"


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
