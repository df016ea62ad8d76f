"""C-STORE SCU to the configured PACS, from a durable queue folder.

A file is in queue/ until the PACS has answered Success (or a warning) for it; only then is it
removed. While the PACS is unreachable, refuses the association or is out of resources, files
stay and the sender retries with exponential backoff (retry_min_seconds doubling to
retry_max_seconds). A file the PACS refuses (SOP class or transfer syntax not supported, dataset
refused) is moved to failed/ with a .reason.txt next to it, so one bad object never blocks the rest.
A PACS's configuration changes, so failed/ is not a dead end: a refused file goes back to queue/
after failed_retry_seconds, doubling with each refusal, until it has been tried failed_retries more
times; then it stays in failed/ (its .retry.json says so). Deleting its .retry.json gives it a fresh
set of tries; a file found in failed/ without one (parked by an older version) is due at once.

Every object is offered as it is stored and, where that is compressed (the Secondary Capture is
JPEG Baseline), also uncompressed (Explicit/Implicit VR Little Endian, which every storage SCP
takes). When the PACS accepts only the uncompressed context, the file is sent as an uncompressed
copy: the same instance (same SOP Instance UID), pixels decoded from the JPEG, still marked lossy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from appliance.config import AppConfig, PacsConfig
from appliance.dicomnet import client_tls_context, quiet_pynetdicom
from appliance.durable import fsync_dir, link_or_copy, write_atomically
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # DICOM's limit of presentation contexts per association
WARNINGS = {0xB000, 0xB006, 0xB007}
# Offered for every object; pynetdicom converts an uncompressed dataset to whichever the PACS took.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
REASON_SUFFIX = ".reason.txt"
RETRY_SUFFIX = ".retry.json"  # in failed/: attempts, next_try (epoch seconds; null: never), reason
MAX_FAILED_WAIT = 24 * 3600.0


def _contexts(sop_class: str, syntax: str) -> list[tuple[str, tuple[str, ...]]]:
    """The presentation contexts (abstract syntax, transfer syntaxes) that offer one stored object."""
    if UID(syntax).is_encapsulated:  # compressed pixel data: as it is, or an uncompressed copy
        return [(sop_class, (syntax,)), (sop_class, UNCOMPRESSED)]
    return [(sop_class, tuple(dict.fromkeys((syntax, *UNCOMPRESSED))))]


def uncompressed_copy(path: Path) -> Dataset:
    """The object in `path` with its pixel data decoded, in Explicit VR Little Endian; the same instance.

    A colour JPEG (YBR_FULL_422) becomes RGB. Lossy Image Compression stays "01": these are the pixels
    of the lossy JPEG, only no longer compressed."""
    ds = pydicom.dcmread(path)
    ds.decompress(generate_instance_uid=False)
    return ds


def _transient(status: int) -> bool:
    """Out of resources (A7xx) or a resource limitation (0213): the same file may succeed later."""
    return 0xA700 <= status <= 0xA7FF or status == 0x0213


class PacsUnavailable(ApplianceError):
    """The PACS could not be reached, refused the association, or cannot store right now."""


@dataclass
class SendReport:
    sent: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    waiting: int = 0


class DicomSender:
    def __init__(
        self, pacs: PacsConfig, queue_dir: Path, *, calling_ae: str, failed_dir: Path | None = None
    ) -> None:
        self.pacs = pacs
        self.queue_dir = Path(queue_dir)
        self.failed_dir = Path(failed_dir) if failed_dir else self.queue_dir.parent / "failed"
        self.calling_ae = pacs.calling_ae_title or calling_ae
        # The TLS files are read now: a missing one stops the start with its name (ConfigError), not
        # every send later as an unexpected error.
        self._tls = (
            client_tls_context(pacs.ca_file, pacs.cert_file, pacs.key_file)
            if pacs.ca_file is not None
            else None
        )
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self.consecutive_failures = 0

    @classmethod
    def from_config(cls, config: AppConfig) -> DicomSender | None:
        pacs = config.dicom_out.pacs
        if pacs is None:
            return None
        return cls(pacs, config.dicom_out.outbox / "queue", calling_ae=config.dicom_net.ae_title)

    # --- the queue ---------------------------------------------------------------------------------

    def enqueue(self, path: Path) -> Path:
        """Queue a complete, fsynced file for the PACS (a hard link: no copy, and atomic)."""
        dest = self.queue_dir / path.name
        link_or_copy(path, dest)  # False: already queued (the same result written again after a crash)
        self._wake.set()
        return dest

    def pending(self) -> list[Path]:
        """Queued files, oldest first."""
        files = [p for p in self.queue_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def depth(self) -> int:
        return len(self.pending())

    # --- sending -----------------------------------------------------------------------------------

    def send_pending(self) -> SendReport:
        """One pass over the queue in one association. Raises PacsUnavailable (files stay queued).

        Refused files in failed/ whose next try is due go back to the queue first."""
        with self._send_lock:
            self._requeue_due()
            files = self.pending()
            report = SendReport()
            if not files:
                return report
            contexts: dict[tuple[str, tuple[str, ...]], None] = {}
            readable: list[tuple[Path, str, str]] = []
            for path in files:
                try:
                    meta = pydicom.dcmread(path, stop_before_pixels=True)
                    sop_class, syntax = str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)
                except Exception as exc:  # a damaged queue file must not block the others
                    self._fail(path, f"unreadable DICOM file: {exc}", report, final=True)
                    continue
                needed = [c for c in _contexts(sop_class, syntax) if c not in contexts]
                if len(contexts) + len(needed) > MAX_CONTEXTS:
                    report.waiting += 1  # next pass
                    continue
                contexts.update(dict.fromkeys(needed))
                readable.append((path, sop_class, syntax))
            if not readable:
                return report
            assoc = self._associate(list(contexts))
            try:
                for path, sop_class, syntax in readable:
                    self._send_one(assoc, path, sop_class, syntax, report)
            finally:
                if assoc.is_established:
                    assoc.release()
            self.consecutive_failures = 0
            report.waiting += len(self.pending())
            return report

    def _associate(self, contexts: list[tuple[str, tuple[str, ...]]]) -> Association:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.pacs.timeout_seconds
        ae.connection_timeout = self.pacs.timeout_seconds
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, list(syntaxes))
        tls = (self._tls, self.pacs.host) if self._tls is not None else None
        where = f"{self.pacs.ae_title}@{self.pacs.host}:{self.pacs.port}"
        assoc = ae.associate(self.pacs.host, self.pacs.port, ae_title=self.pacs.ae_title, tls_args=tls)
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            raise PacsUnavailable(f"{where} rejected the association (calling AE {self.calling_ae})")
        raise PacsUnavailable(f"{where} not reachable (connection refused, aborted or timed out)")

    def _send_one(
        self, assoc: Association, path: Path, sop_class: str, syntax: str, report: SendReport
    ) -> None:
        if not assoc.is_established:
            raise PacsUnavailable("the PACS dropped the association")
        accepted = {
            str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class
        }
        payload: Path | Dataset = path
        how = ""
        if syntax not in accepted and UID(syntax).is_encapsulated and accepted & set(UNCOMPRESSED):
            try:
                payload = uncompressed_copy(path)
            except Exception as exc:  # no decoder, damaged pixel data: this file cannot go uncompressed
                self._fail(
                    path, f"the PACS takes {sop_class} uncompressed only; cannot decode: {exc}", report
                )
                return
            how = ", sent uncompressed"
        try:
            answer = assoc.send_c_store(payload)
        except ValueError as exc:  # no accepted presentation context for this SOP class/syntax
            offered = ", ".join(sorted(accepted)) or "nothing"
            self._fail(
                path,
                f"the PACS accepts no presentation context for {sop_class} in {syntax} "
                f"(it accepted {offered}): {exc}",
                report,
            )
            return
        status = answer.get("Status")
        if status is None:
            raise PacsUnavailable(f"no C-STORE response for {path.name} (association lost or timed out)")
        status = int(status)
        if status == 0x0000 or status in WARNINGS:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._forget_failure(path.name)
            report.sent.append(path.name)
            log.info("sent %s to PACS %s (status 0x%04X%s)", path.name, self.pacs.ae_title, status, how)
        elif _transient(status):
            raise PacsUnavailable(f"PACS answered 0x{status:04X} for {path.name}: out of resources / busy")
        else:
            comment = answer.get("ErrorComment", "")
            self._fail(path, f"PACS refused it: status 0x{status:04X} {comment}".strip(), report)

    # --- failed/: refused files, tried again with backoff up to a limit ----------------------------

    def _retry_file(self, name: str) -> Path:
        return self.failed_dir / (name + RETRY_SUFFIX)

    def _attempts(self, name: str) -> int:
        """How often the PACS has refused the file `name` so far (0: never, or forgotten)."""
        try:
            return int(json.loads(self._retry_file(name).read_text(encoding="utf-8"))["attempts"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _fail(self, path: Path, reason: str, report: SendReport, *, final: bool = False) -> None:
        """Move a refused file to failed/ and say when it is tried again (never when `final`)."""
        dest = self.failed_dir / path.name
        attempts = self._attempts(path.name) + 1
        retries = self.pacs.failed_retries
        wait = min(self.pacs.failed_retry_seconds * 2.0 ** (attempts - 1), MAX_FAILED_WAIT)
        again = not final and attempts <= retries
        shutil.move(path, dest)
        state = {
            "attempts": attempts,
            "next_try": time.time() + wait if again else None,
            "wait_seconds": wait if again else None,
            "reason": reason,
        }
        write_atomically(self._retry_file(path.name), (json.dumps(state) + "\n").encode())
        if again:
            outlook = f"tried again in {wait:g} s (retry {attempts} of {retries})"
        elif final:
            outlook = "not tried again"
        else:
            outlook = f"given up after {attempts} attempts; delete {path.name}{RETRY_SUFFIX} to try again"
        write_atomically(dest.with_name(dest.name + REASON_SUFFIX), f"{reason}\n{outlook}\n".encode())
        report.failed.append(path.name)
        log.error(
            "DICOM result %s not sent: %s (kept in %s, %s)", path.name, reason, self.failed_dir, outlook
        )

    def _forget_failure(self, name: str) -> None:
        for suffix in (RETRY_SUFFIX, REASON_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                (self.failed_dir / (name + suffix)).unlink()

    def _failed_files(self) -> list[Path]:
        return [
            p
            for p in self.failed_dir.iterdir()
            if p.is_file()
            and not p.name.startswith(".")
            and not p.name.endswith((RETRY_SUFFIX, REASON_SUFFIX))
        ]

    def _next_try(self, path: Path) -> float | None:
        """When the refused file `path` is due again (epoch seconds), None when never."""
        try:
            next_try = json.loads(self._retry_file(path.name).read_text(encoding="utf-8"))["next_try"]
        except FileNotFoundError:
            return 0.0  # parked before retries existed (or by hand): due now
        except (OSError, ValueError, KeyError, TypeError):
            return None  # damaged: leave it to a person
        return float(next_try) if next_try is not None else None

    def _requeue_due(self) -> None:
        now = time.time()
        for path in self._failed_files():
            due = self._next_try(path)
            if due is None or due > now:
                continue
            try:
                os.replace(path, self.queue_dir / path.name)
                fsync_dir(self.queue_dir)
            except FileNotFoundError:
                continue
            log.info(
                "DICOM result %s: trying the PACS again (refused %d time(s) before)",
                path.name,
                self._attempts(path.name),
            )

    def seconds_to_next_retry(self) -> float | None:
        """Seconds until the first refused file in failed/ is due again; None when none will be."""
        due = [t for t in (self._next_try(p) for p in self._failed_files()) if t is not None]
        return max(0.0, min(due) - time.time()) if due else None

    # --- the background thread ---------------------------------------------------------------------

    def start(self) -> DicomSender:
        quiet_pynetdicom()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dicom-sender", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        delay = self.pacs.retry_min_seconds
        while not self._stop.is_set():
            self._wake.clear()
            try:
                report = self.send_pending()
            except PacsUnavailable as exc:
                self.consecutive_failures += 1
                log.warning(
                    "PACS: %s; %d object(s) wait in %s, next try in %.0f s",
                    exc,
                    self.depth(),
                    self.queue_dir,
                    delay,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, self.pacs.retry_max_seconds)
                continue
            except Exception:  # a bug must not end the thread: the queue is durable, try again later
                log.exception("DICOM sender: unexpected error; retrying in %.0f s", delay)
                self._stop.wait(delay)
                continue
            delay = self.pacs.retry_min_seconds
            if report.waiting == 0:
                # Rescan now and then, whatever wakes us, and when a refused file is due again.
                retry = self.seconds_to_next_retry()
                self._wake.wait(timeout=60.0 if retry is None else min(60.0, retry))
