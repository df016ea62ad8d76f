"""`cxr-appliance usb-import MOUNTPOINT_OR_DEVICE`: copy every image on a USB stick into the spool.

The stick is walked recursively; a DICOMDIR, when present, is read with pydicom to skip non-image
records (reports, presentation states) and to report files it lists that are missing. Nothing on
the stick is ever written or deleted: each file goes to the intake (appliance/ingest/intake.py) under
its USB rules, which copies it into the spool's incoming side and de-duplicates (SOPInstanceUID +
content hash, remembered across imports, so re-inserting a stick is harmless).

Hostile media are expected: DICOMDIR file ids with `..` or absolute parts, symlinks leading off
the stick, FIFOs and device nodes, odd file names. Those are refused with a reason, logged, counted
and reported; the import carries on with the rest. Files that are not images at all (README.TXT,
autorun.inf, reports) are skipped rather than quarantined; the intake's other refusals (too large,
unreadable) are quarantined as from any source and reported as skipped.

Progress and the final counts go to the log and over MQTT (QoS 1) to
`<prefix>/<site>/<device_id>/usb_import`. MQTT gets counts only (refusals counted by reason): file
and folder names on a stick often carry a patient's name and number (`DOE_JANE_1962-03-04_MRN123456/`).
The log names the files, escaped and cut to MAX_LOGGED_PATH characters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.config import AppConfig
from appliance.errors import UserError

if TYPE_CHECKING:  # imported when used: the CLI imports this module to build its parser
    from appliance.ingest.intake import Intake
    from appliance.ingest.spool import Spool

log = logging.getLogger(__name__)

PROGRESS_SCHEMA = "cxr-appliance/usb-import/v1"
MAX_LOGGED_PATH = 160
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
WAIT_MOUNT_ENV = "CXR_USB_WAIT_MOUNT"


ProgressSink = Callable[[dict[str, Any]], None]


@dataclass
class Refusal:
    path: str  # relative to the stick's root, control characters escaped
    reason: str


@dataclass
class ImportReport:
    root: str
    found: int = 0
    imported: int = 0
    duplicates: int = 0
    skipped: list[Refusal] = field(default_factory=list)  # not images, or quarantined by the intake
    refused: list[Refusal] = field(default_factory=list)  # escapes the stick, not a regular file
    missing: list[str] = field(default_factory=list)  # listed in the DICOMDIR but absent

    def counts(self) -> dict[str, int]:
        return {
            "found": self.found,
            "imported": self.imported,
            "duplicates": self.duplicates,
            "skipped": len(self.skipped),
            "refused": len(self.refused),
            "missing": len(self.missing),
        }


# --- finding the files ------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _rel(path: Path, root: Path) -> str:
    try:
        text = str(path.relative_to(root))
    except ValueError:
        text = str(path)
    text = repr(text)[1:-1]  # a newline in a file name must not forge a log line
    return text if len(text) <= MAX_LOGGED_PATH else text[: MAX_LOGGED_PATH - 3] + "..."


def _by_reason(refusals: list[Refusal]) -> dict[str, int]:
    """Counts per reason, without the details (an error text or a quoted file id may hold a name)."""
    counts: dict[str, int] = {}
    for item in refusals:
        reason = _QUOTED.sub("'...'", item.reason.split(" (", 1)[0])
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def _unsafe_file_id(parts: list[str]) -> str | None:
    """Why a DICOMDIR ReferencedFileID is unsafe, or None when it is a plain relative path."""
    if not parts:
        return "empty file id"
    for part in parts:
        if part in ("", ".", ".."):
            return f"file id component {part!r}"
        if "/" in part or "\\" in part or "\0" in part:
            return f"file id component {part!r} holds a separator"
    if len(parts[0]) >= 2 and parts[0][1] == ":":
        return "absolute file id"
    return None


@dataclass
class _DicomDirView:
    listed: set[Path] = field(default_factory=set)  # every file a record references (resolved)
    images: set[Path] = field(default_factory=set)  # those referenced by IMAGE records


def _read_dicomdir(dicomdir: Path, root: Path, report: ImportReport) -> _DicomDirView:
    """Resolve the DICOMDIR's file references, refusing any that would leave the stick."""
    import pydicom

    view = _DicomDirView()
    try:
        ds = pydicom.dcmread(dicomdir)
        records = list(ds.get("DirectoryRecordSequence", []))
    except Exception as exc:  # a broken DICOMDIR must not stop the plain walk
        report.skipped.append(Refusal(_rel(dicomdir, root), f"unreadable DICOMDIR ({exc})"))
        log.warning("USB import: cannot read DICOMDIR %s: %s", dicomdir, exc)
        return view
    base = dicomdir.parent
    for record in records:
        file_id = record.get("ReferencedFileID")
        if file_id is None:
            continue
        parts = (
            [str(p) for p in file_id]
            if isinstance(file_id, list | pydicom.multival.MultiValue)
            else [str(file_id)]
        )
        shown = "\\".join(parts)
        why = _unsafe_file_id(parts)
        target = base.joinpath(*parts) if why is None else base
        if why is None:
            try:
                resolved = target.resolve()
            except (OSError, RuntimeError) as exc:
                why = f"cannot resolve ({exc})"
            else:
                if not _inside(resolved, root):
                    why = "points outside the stick"
        if why is not None:
            report.refused.append(Refusal(f"DICOMDIR:{shown}", why))
            continue
        if not resolved.exists():
            report.missing.append(_rel(target, root))
            continue
        view.listed.add(resolved)
        if str(record.get("DirectoryRecordType", "")).strip().upper() == "IMAGE":
            view.images.add(resolved)
    return view


def _walk(root: Path, report: ImportReport) -> Iterator[Path]:
    """Regular files under root, symlinks only when they stay on the stick; sorted for a stable order."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames.sort()
        for name in list(dirnames):
            entry = here / name
            if entry.is_symlink():
                # Never descend through links (loops, escapes); report those that leave the stick.
                dirnames.remove(name)
                if not _inside(entry.resolve(), root):
                    report.refused.append(Refusal(_rel(entry, root), "symlink points outside the stick"))
        for name in sorted(filenames):
            entry = here / name
            try:
                st = entry.lstat()
                if stat.S_ISLNK(st.st_mode):
                    target = entry.resolve(strict=True)
                    if not _inside(target, root):
                        report.refused.append(Refusal(_rel(entry, root), "symlink points outside the stick"))
                        continue
                    st = target.stat()
            except (OSError, RuntimeError) as exc:
                report.refused.append(Refusal(_rel(entry, root), f"broken or looping symlink ({exc})"))
                continue
            if not stat.S_ISREG(st.st_mode):
                # Reading a FIFO would block; device nodes have no business on a stick.
                report.refused.append(Refusal(_rel(entry, root), "not a regular file"))
                continue
            yield entry


# --- the import -------------------------------------------------------------------------------


def import_tree(
    root: Path,
    spool: Intake | Spool,
    *,
    source: str | None = None,
    progress: ProgressSink | None = None,
    progress_every_s: float = 2.0,
) -> ImportReport:
    """Offer every file under `root` to the intake under USB rules; never modify `root`.

    A bare Spool gets an Intake with the default limits (the CLI passes one built from the config)."""
    from appliance.ingest import reasons
    from appliance.ingest.intake import USB, Verdict, as_intake

    intake = as_intake(spool)
    root = Path(root).resolve()
    if not root.is_dir():
        raise UserError(f"USB import: {root} is not a folder (is the stick mounted?)")
    report = ImportReport(root=str(root))
    source = source or f"usb:{root.name}"
    emit: ProgressSink = progress or (lambda event: None)

    def event(state: str, **extra: Any) -> dict[str, Any]:
        return {
            "schema": PROGRESS_SCHEMA,
            "state": state,
            "source": source,
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **report.counts(),
            **extra,
        }

    emit(event("started"))
    log.info("USB import from %s started", root)
    files = list(_walk(root, report))
    view = _DicomDirView()
    for dicomdir in (p for p in files if p.name.upper() == "DICOMDIR"):
        one = _read_dicomdir(dicomdir, root, report)
        view.listed |= one.listed
        view.images |= one.images

    last = time.monotonic()
    for path in files:
        rel = _rel(path, root)
        resolved = path.resolve()
        if path.name.upper() == "DICOMDIR" or (resolved in view.listed and resolved not in view.images):
            # The stick's own index says so: skipped without reading it.
            report.skipped.append(Refusal(rel, reasons.NON_IMAGE_DICOM))
            continue
        # A link to another file on the stick (checked by _walk) goes in as its target: the spool
        # refuses links, which in a watched folder could be swapped to point anywhere.
        outcome = intake.offer(resolved if path.is_symlink() else path, source, USB)
        if outcome.verdict is Verdict.SKIPPED:
            report.skipped.append(Refusal(rel, outcome.reason))
            continue
        report.found += 1
        if outcome.verdict is Verdict.DEFERRED:
            emit(event("failed", error=outcome.reason))
            raise UserError(f"USB import stopped at {rel}: {outcome.reason}; nothing was deleted")
        if outcome.verdict is Verdict.ACCEPTED:
            report.imported += 1
        elif outcome.verdict is Verdict.DUPLICATE:
            report.duplicates += 1
        else:
            report.skipped.append(Refusal(rel, outcome.reason))
        if time.monotonic() - last >= progress_every_s:
            last = time.monotonic()
            emit(event("progress"))
            log.info("USB import from %s: %s", root, report.counts())

    for item in report.refused:
        log.warning("USB import refused %s: %s", item.path, item.reason)
    for item in report.skipped:
        log.info("USB import skipped %s: %s", item.path, item.reason)
    for missing in report.missing:
        log.warning("USB import: DICOMDIR lists %s, which is not on the stick", missing)
    emit(
        event(
            "done", refused_by_reason=_by_reason(report.refused), skipped_by_reason=_by_reason(report.skipped)
        )
    )
    log.info("USB import from %s done: %s", root, report.counts())
    return report


# --- mount point, MQTT, command line --------------------------------------------------------


def _mountpoint_of_device(device: Path) -> Path | None:
    rdev = device.stat().st_rdev
    wanted = f"{os.major(rdev)}:{os.minor(rdev)}"
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[2] == wanted:
                # mountinfo escapes spaces etc. as octal (\040).
                return Path(fields[4].encode().decode("unicode_escape"))
    return None


def resolve_mountpoint(target: Path, wait_s: float = 0.0, poll_s: float = 0.5) -> Path:
    """The folder to import from: `target` itself, or where the block device `target` is mounted.

    With wait_s > 0 wait that long for the mount (systemd-mount --no-block returns before it).
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            mode = target.stat().st_mode
        except FileNotFoundError:
            mode = 0
        if stat.S_ISBLK(mode):
            found = _mountpoint_of_device(target)
            if found is not None:
                return found
        elif stat.S_ISDIR(mode) and (wait_s <= 0 or os.path.ismount(target)):
            return target
        if time.monotonic() >= deadline:
            what = "not mounted" if mode else "does not exist"
            raise UserError(f"USB import: {target} {what}" + (f" after {wait_s:g} s" if wait_s > 0 else ""))
        time.sleep(poll_s)


def mqtt_progress(cfg: AppConfig) -> tuple[ProgressSink, Callable[[], None]]:
    """A sink publishing progress events over MQTT, and a close() that waits for the PUBACKs.

    A separate client id: the daemon holds the configured one and the broker would kick it off.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from appliance.publish.mqtt import tls_context
    from appliance.publish.topics import Topics

    m = cfg.mqtt
    base = m.client_id or f"cxr-{cfg.device.site}-{cfg.device.device_id}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{base}-usb", protocol=mqtt.MQTTv311)
    if m.username:
        password = m.password()
        client.username_pw_set(m.username, password.get_secret_value() if password else None)
    ctx = tls_context(m)
    if ctx is not None:
        client.tls_set_context(ctx)
    topic = f"{Topics(m.topic_prefix, cfg.device.site, cfg.device.device_id).base}/usb_import"
    pending: list[mqtt.MQTTMessageInfo] = []
    try:
        client.connect(m.host, m.port, keepalive=m.keepalive)
    except OSError as exc:
        # The import itself must not depend on the broker: the log has everything.
        log.warning(
            "USB import: broker %s:%s unreachable (%s); progress goes to the log only", m.host, m.port, exc
        )
        return (lambda event: None), (lambda: None)
    client.loop_start()

    def sink(event: dict[str, Any]) -> None:
        pending.append(client.publish(topic, json.dumps(event), qos=m.qos))

    def close() -> None:
        for info in pending:
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=10)
        client.disconnect()
        client.loop_stop()

    return sink, close


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options beyond `mount` and `--config` for the `usb-import` sub-command."""
    parser.add_argument(
        "--wait-mount",
        type=float,
        metavar="SECONDS",
        help=f"wait this long for the mount to appear (default ${WAIT_MOUNT_ENV} or 0)",
    )
    parser.add_argument("--no-mqtt", action="store_true", help="report to the log only")


def main(args: argparse.Namespace, cfg: AppConfig) -> int:
    """`cxr-appliance usb-import MOUNT`: exit 0 when the walk finished, even if some files were refused."""
    from appliance.ingest.intake import Intake
    from appliance.ingest.spool import Spool
    from appliance.pseudonym import image_id_secret

    wait = getattr(args, "wait_mount", None)
    if wait is None:
        # The udev-started unit sets the wait in its environment (systemd-mount --no-block returns early).
        wait = float(os.environ.get(WAIT_MOUNT_ENV, "0") or 0)
    root = resolve_mountpoint(Path(args.mount), wait)
    sink: ProgressSink | None = None
    close: Callable[[], None] = lambda: None  # noqa: E731
    if cfg.mqtt.enabled and not getattr(args, "no_mqtt", False):
        sink, close = mqtt_progress(cfg)
    # The daemon's image-id key: an image imported here gets the id the daemon would give it.
    spool = Spool(cfg.ingest.spool, min_free_mb=cfg.ingest.min_free_mb, id_secret=image_id_secret(cfg))
    try:
        # No gate and no metrics: this is a process of its own; the spool's disk reserve still applies.
        report = import_tree(root, Intake.from_config(cfg, spool), progress=sink)
    finally:
        close()
        spool.close()
    print(json.dumps({"root": report.root, **report.counts()}))
    return 0
