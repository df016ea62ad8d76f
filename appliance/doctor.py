"""`cxr-appliance doctor`: check everything the cart needs and say plainly what is wrong.

Each check prints one verdict line (OK / WARN / FAIL) with the reason and, where it helps, what to
do. Exit status 1 when any check fails, so install scripts and engineers can rely on it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from appliance.config import AppConfig
from appliance.errors import ApplianceError, UserError

Verdict = Literal["OK", "WARN", "FAIL"]


@dataclass
class Check:
    verdict: Verdict
    topic: str
    message: str


def _config_check(
    args: argparse.Namespace, load: Callable[[argparse.Namespace], AppConfig]
) -> tuple[Check, AppConfig | None]:
    try:
        config = load(args)
    except UserError as exc:
        return Check("FAIL", "config", str(exc)), None
    where = args.config or "built-in defaults (no --config, no /etc/cxr-appliance/config.yaml)"
    return Check("OK", "config", f"{where} is valid"), config


def check_model(config: AppConfig) -> Iterator[Check]:
    from appliance.backends.select import create_backend
    from appliance.manifest import load_manifest
    from appliance.pipeline import Analyzer

    try:
        manifest = load_manifest(config.inference.model)
    except UserError as exc:
        yield Check("FAIL", "model", str(exc))
        return
    for precision in manifest.onnx:
        try:
            digest = manifest.verify_file(precision)
            yield Check(
                "OK",
                "model",
                f"{manifest.name} {manifest.version} {precision.value}: sha256 {digest[:12]}… matches",
            )
        except UserError as exc:
            yield Check("FAIL", "model", str(exc))
    try:
        backend = create_backend(manifest, config.inference)
        warm_ms = Analyzer(config, manifest, backend).warm_up()
    except (ApplianceError, OSError) as exc:
        yield Check("FAIL", "backend", f"cannot run the model: {exc}")
        return
    label = f"{backend.name}/{backend.precision}, first inference {warm_ms:.0f} ms"
    if backend.fallback_reason:
        yield Check("WARN", "backend", f"FALLBACK {label}: {backend.fallback_reason}")
    else:
        yield Check("OK", "backend", label)
    backend.close()


def check_site_overlay(config: AppConfig) -> Iterator[Check]:
    """Which operating points the cart uses: the manifest's, or a site overlay that fits the model."""
    from appliance.manifest import load_manifest
    from appliance.overlay import describe, load_for

    path = config.inference.site_overlay
    if path is None:
        yield Check("OK", "overlay", "none: the model manifest's operating points")
        return
    try:
        manifest = load_manifest(config.inference.model)
        overlay = load_for(path, manifest, config.inference.model)
    except UserError as exc:
        yield Check("FAIL", "overlay", f"{exc} (the daemon will not start with it)")
        return
    yield Check("OK", "overlay", f"{path}: {describe(overlay, manifest)}")


def check_decoders() -> Iterator[Check]:
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless

    for uid in (JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, JPEG2000, RLELossless):
        decoder = get_decoder(uid)
        if decoder.is_available:
            yield Check("OK", "decoder", f"{uid.name}: {', '.join(decoder.available_plugins)}")
        else:
            yield Check(
                "FAIL",
                "decoder",
                f"{uid.name}: no decoder installed (pip install python-gdcm pylibjpeg-openjpeg)",
            )
    from appliance.ingest import openjpeg

    library = openjpeg.library_path()
    if library is not None:
        yield Check("OK", "decoder", f"JPEG 2000 fast path (GIL released): {library}")
    else:
        yield Check(
            "WARN",
            "decoder",
            "JPEG 2000 fast path: no libopenjp2 to load (apt install libopenjp2-7); Pillow decodes"
            " JPEG 2000 instead, slower in a backlog",
        )


def _writable(folder: Path) -> str | None:
    if not folder.exists():
        return "does not exist"
    if not folder.is_dir():
        return "is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "is not writable by this user"
    return None


def _creatable(folder: Path) -> str | None:
    """Why `folder` could not be made as the start makes it (mkdir with its parents), or None."""
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():
            return f"{ancestor} is a broken link"
        ancestor = ancestor.parent
    problem = _writable(ancestor)
    return None if problem is None else f"{ancestor} {problem}"


def _folders(config: AppConfig) -> list[tuple[str, Path]]:
    """Every folder the start creates or writes, as `run` would (its parts' own defaults)."""
    ingest = config.ingest
    folders = [("watch", ingest.watch), ("spool", ingest.spool), ("journal", config.journal.path.parent)]
    if config.dicom_net.enabled:
        folders.append(("dicom_net.receive_dir", config.dicom_net.receive_dir or ingest.spool / "dicom-in"))
    if config.dicom_out.enabled:
        folders.append(("dicom_out.outbox", config.dicom_out.outbox))
    return folders


def check_folders(config: AppConfig) -> Iterator[Check]:
    ingest = config.ingest
    for name, folder in _folders(config):
        problem = _writable(folder)
        if problem is None:
            yield Check("OK", "folders", f"{name} {folder} is writable")
        elif problem == "does not exist" and (cannot := _creatable(folder)) is None:
            yield Check("WARN", "folders", f"{name} {folder} does not exist yet (created at start)")
        elif problem == "does not exist":
            yield Check("FAIL", "folders", f"{name} {folder} does not exist and cannot be created: {cannot}")
        else:
            yield Check("FAIL", "folders", f"{name} {folder} {problem}")
    for folder in ingest.extra_watch:
        if folder.is_dir():
            yield Check("OK", "folders", f"extra watch {folder} present")
        else:
            yield Check("WARN", "folders", f"extra watch {folder} not present (USB stick not mounted?)")
    probe = ingest.spool if ingest.spool.exists() else ingest.spool.parent
    if probe.exists():
        free_mb = shutil.disk_usage(probe).free / 2**20
        verdict: Verdict = "OK" if free_mb >= ingest.min_free_mb else "FAIL"
        yield Check(
            verdict,
            "disk",
            f"{free_mb:.0f} MB free for the spool (stops accepting below {ingest.min_free_mb:.0f} MB)",
        )


def check_listeners(config: AppConfig) -> Iterator[Check]:
    """Each address the cart listens on belongs to this machine (a bind address copied from another cart
    made `run` stop with "cannot listen"). Only the address: the port is the running daemon's own."""
    listeners = []
    if config.dicom_net.enabled:
        listeners.append(("dicom_net", config.dicom_net.bind, config.dicom_net.port))
    if config.metrics.enabled:
        listeners.append(("metrics", config.metrics.host, config.metrics.port))
    for name, host, port in listeners:
        where = host or "every address"
        try:
            # As the servers resolve it: a passive address ("" = every address), IPv4 first (pynetdicom)
            found = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            ipv4 = [entry for entry in found if entry[0] == socket.AF_INET]
            family, kind, proto, _, address = (ipv4 if name == "dicom_net" and ipv4 else found)[0]
            with socket.socket(family, kind, proto) as probe:
                probe.bind(address)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            yield Check("FAIL", "network", f"{name}: cannot listen on {where} (port {port}): {reason}")
        else:
            yield Check("OK", "network", f"{name}: can listen on {where} (port {port})")


def check_journal(config: AppConfig) -> Iterator[Check]:
    if not config.journal.path.exists():
        yield Check("OK", "journal", f"{config.journal.path} not created yet")
        return
    from appliance.journal import Journal

    journal = Journal.from_config(config.journal)
    problems = journal.integrity_check()
    counts = journal.counts()
    journal.close()
    if problems and problems != ["ok"]:
        yield Check("FAIL", "journal", f"integrity check: {'; '.join(problems)}")
    else:
        yield Check("OK", "journal", f"integrity ok, {counts}")


def check_privacy(config: AppConfig) -> Iterator[Check]:
    """The salt judged as the start judges it (pseudonym.load_or_create_salt): size, mode, type."""
    from appliance.errors import ConfigError
    from appliance.pseudonym import load_or_create_salt

    salt = config.privacy.salt_file
    if not salt.exists() and not salt.is_symlink():
        cannot = _creatable(salt.parent)
        if cannot is None:
            yield Check(
                "WARN",
                "privacy",
                f"salt {salt} missing (created at start; patient keys change if it is lost)",
            )
        else:
            yield Check("FAIL", "privacy", f"salt {salt} missing and cannot be created: {cannot}")
        return
    try:
        load_or_create_salt(salt, create=False)
    except ConfigError as exc:
        yield Check("FAIL", "privacy", str(exc))
    else:
        yield Check("OK", "privacy", f"salt {salt} present, no access for group or others")


def check_broker(config: AppConfig) -> Iterator[Check]:
    mqtt_config = config.mqtt
    if not mqtt_config.enabled:
        yield Check("WARN", "broker", "mqtt.enabled is false: results stay in the journal")
        return
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from appliance.publish.credentials import apply_credentials

    target = f"{mqtt_config.host}:{mqtt_config.port}"
    try:
        socket.create_connection((mqtt_config.host, mqtt_config.port), timeout=3).close()
    except OSError as exc:
        yield Check("FAIL", "broker", f"{target} unreachable: {exc.strerror or exc} (is mosquitto running?)")
        return
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"cxr-doctor-{os.getpid()}")
    try:
        apply_credentials(client, mqtt_config)
        outcome: list[str] = []
        client.on_connect = lambda c, u, f, reason, p: outcome.append(str(reason))
        client.connect(mqtt_config.host, mqtt_config.port, keepalive=10)
        deadline = time.monotonic() + 5
        while not outcome and time.monotonic() < deadline:
            client.loop(timeout=0.2)
        client.disconnect()
    except (OSError, ssl.SSLError, UserError) as exc:
        yield Check("FAIL", "broker", f"{target}: {exc}")
        return
    if outcome == ["Success"]:
        tls = "TLS" if mqtt_config.tls else "no TLS"
        yield Check("OK", "broker", f"{target} accepted {mqtt_config.username or 'anonymous'} ({tls})")
    else:
        yield Check(
            "FAIL",
            "broker",
            f"{target} refused the connection: {outcome[0] if outcome else 'no answer in 5 s'}",
        )


def check_tls_files(config: AppConfig) -> Iterator[Check]:
    """Every configured certificate and key loaded as the part that uses it will load it at start: a
    missing or unreadable one made `doctor` say READY and `run` stop."""
    from appliance.dicomnet import client_tls_context, server_tls_context
    from appliance.websecurity import server_context

    loads: list[tuple[str, Callable[[], object]]] = []
    if config.display.tls is not None:
        tls = config.display.tls
        loads.append(("display.tls", lambda: server_context(tls.cert_file, tls.key_file, "display")))
    if config.metrics.enabled and config.metrics.tls is not None:
        mtls = config.metrics.tls
        loads.append(("metrics.tls", lambda: server_context(mtls.cert_file, mtls.key_file, "metrics")))
    if config.dicom_net.enabled and config.dicom_net.tls is not None:
        dtls = config.dicom_net.tls
        loads.append(
            ("dicom_net.tls", lambda: server_tls_context(dtls.cert_file, dtls.key_file, dtls.ca_file))
        )
    pacs = config.dicom_out.pacs if config.dicom_out.enabled else None
    if pacs is not None and pacs.ca_file is not None:
        ca = pacs.ca_file
        loads.append(("dicom_out.pacs", lambda: client_tls_context(ca, pacs.cert_file, pacs.key_file)))
    for name, load in loads:
        try:
            load()
        except UserError as exc:
            yield Check("FAIL", "tls", str(exc))
        else:
            yield Check("OK", "tls", f"{name}: certificate and key load")


def _guarded(group: Iterator[Check], topic: str) -> Iterator[Check]:
    """One group's failure is its own FAIL line: the other checks and the verdict still come."""
    try:
        yield from group
    except Exception as exc:  # e.g. a journal that is not a database, a folder that cannot be read
        yield Check("FAIL", topic, f"{type(exc).__name__}: {exc}")


def run_doctor(config_path: Path | None, load: Callable[[argparse.Namespace], AppConfig]) -> int:
    args = argparse.Namespace(config=config_path)
    first, config = _config_check(args, load)
    checks = [first]
    print(f"{first.verdict:4}  {first.topic:8} {first.message}", flush=True)
    if config is not None:
        groups: list[tuple[Iterator[Check], str]] = [
            (check_model(config), "model"),
            (check_site_overlay(config), "overlay"),
            (check_decoders(), "decoders"),
            (check_folders(config), "folders"),
            (check_journal(config), "journal"),
            (check_privacy(config), "privacy"),
            (check_tls_files(config), "tls"),
            (check_listeners(config), "network"),
            (check_broker(config), "broker"),
        ]
        for group, topic in groups:
            for check in _guarded(group, topic):  # generators: each line prints as soon as its check is done
                checks.append(check)
                print(f"{check.verdict:4}  {check.topic:8} {check.message}", flush=True)
    failed = sum(c.verdict == "FAIL" for c in checks)
    warned = sum(c.verdict == "WARN" for c in checks)
    print(f"\n{'NOT READY' if failed else 'READY'}: {failed} failed, {warned} warning(s)")
    return 1 if failed else 0
