"""`cxr-appliance usb-import MOUNTPOINT_OR_DEVICE`: copy every image on a USB stick into the spool.

The stick is walked recursively; a DICOMDIR, when present, is read with pydicom to skip non-image
records (reports, presentation states) and to report files it lists that are missing. Nothing on
the stick is ever written or deleted: each file goes to the intake (appliance/ingest/intake.py) under
its USB rules, which copies it into the spool's incoming side and de-duplicates (SOPInstanceUID +
content hash, remembered across imports, so re-inserting a stick is harmless).

Hostile media are expected (usb_stick.py reads the stick without trusting it): entries that escape
the stick or are no regular files are refused with a reason, logged, counted and reported; the import
carries on with the rest. Files that are not images at all (README.TXT, autorun.inf, reports) are
skipped rather than quarantined; the intake's other refusals (too large, unreadable) are quarantined as
from any source and reported as skipped.

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
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.config import AppConfig
from appliance.errors import UserError
from appliance.usb_stick import ImportReport, Refusal, count_by_reason, resolve_mountpoint, shown_path, survey

if TYPE_CHECKING:  # imported when used: the CLI imports this module to build its parser
    from appliance.ingest.intake import Intake
    from appliance.ingest.spool import Spool

log = logging.getLogger(__name__)

PROGRESS_SCHEMA = "cxr-appliance/usb-import/v1"
WAIT_MOUNT_ENV = "CXR_USB_WAIT_MOUNT"


ProgressSink = Callable[[dict[str, Any]], None]


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
    files, view = survey(root, report)

    last = time.monotonic()
    for path in files:
        rel = shown_path(path, root)
        resolved = path.resolve()
        if path.name.upper() == "DICOMDIR" or (resolved in view.listed and resolved not in view.images):
            # The stick's own index says so: skipped without reading it.
            report.skipped.append(Refusal(rel, reasons.NON_IMAGE_DICOM))
            continue
        # A link to another file on the stick (checked by walk_stick) goes in as its target: the spool
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
            "done",
            refused_by_reason=count_by_reason(report.refused),
            skipped_by_reason=count_by_reason(report.skipped),
        )
    )
    log.info("USB import from %s done: %s", root, report.counts())
    return report


def mqtt_progress(cfg: AppConfig) -> tuple[ProgressSink, Callable[[], None]]:
    """A sink publishing progress events over MQTT, and a close() that waits for the PUBACKs.

    A separate client id: the daemon holds the configured one and the broker would kick it off.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from appliance.publish.credentials import apply_credentials
    from appliance.publish.topics import Topics

    m = cfg.mqtt
    base = m.client_id or f"cxr-{cfg.device.site}-{cfg.device.device_id}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{base}-usb", protocol=mqtt.MQTTv311)
    apply_credentials(client, m)
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
    from appliance.store import Store

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
    store = Store(cfg.journal.path, "appliance database")  # the daemon's: its spool rows live there
    spool = Spool.from_config(cfg, store)
    try:
        # No gate and no metrics: this is a process of its own; the spool's disk reserve still applies.
        report = import_tree(root, Intake.from_config(cfg, spool), progress=sink)
    finally:
        close()
        store.close()
    print(json.dumps({"root": report.root, **report.counts()}))
    return 0
