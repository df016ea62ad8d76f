"""C-STORE SCU to the configured PACS, from a durable queue folder.

A file is in queue/ until the PACS has answered Success (or a warning) for it; only then is it
removed. While the PACS is unreachable, refuses the association or is out of resources, files
stay and the sender retries with exponential backoff (retry_min_seconds doubling to
retry_max_seconds). A file the PACS refuses for good (SOP class not supported, dataset refused)
is moved to failed/ with a .reason.txt next to it, so one bad object never blocks the rest.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.association import Association

from appliance.config import AppConfig, PacsConfig
from appliance.dicomnet import client_tls_context, quiet_pynetdicom
from appliance.durable import fsync_dir, write_atomically
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # DICOM's limit of presentation contexts per association
WARNINGS = {0xB000, 0xB006, 0xB007}


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
        try:
            os.link(path, dest)
            fsync_dir(self.queue_dir)
        except FileExistsError:
            pass  # already queued (the same result written again after a crash)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            write_atomically(dest, path.read_bytes())  # another filesystem: a durable copy
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
        """One pass over the queue in one association. Raises PacsUnavailable (files stay queued)."""
        with self._send_lock:
            files = self.pending()
            report = SendReport()
            if not files:
                return report
            contexts: dict[tuple[str, str], None] = {}
            readable: list[tuple[Path, str, str]] = []
            for path in files:
                try:
                    meta = pydicom.dcmread(path, stop_before_pixels=True)
                    key = (str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID))
                except Exception as exc:  # a damaged queue file must not block the others
                    self._fail(path, f"unreadable DICOM file: {exc}", report)
                    continue
                if key not in contexts and len(contexts) >= MAX_CONTEXTS:
                    report.waiting += 1  # next pass
                    continue
                contexts[key] = None
                readable.append((path, *key))
            if not readable:
                return report
            assoc = self._associate(list(contexts))
            try:
                for path, sop_class, _ in readable:
                    self._send_one(assoc, path, sop_class, report)
            finally:
                if assoc.is_established:
                    assoc.release()
            self.consecutive_failures = 0
            report.waiting += len(self.pending())
            return report

    def _associate(self, contexts: list[tuple[str, str]]) -> Association:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.pacs.timeout_seconds
        ae.connection_timeout = self.pacs.timeout_seconds
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, syntax)
        tls = (client_tls_context(self.pacs.ca_file), self.pacs.host) if self.pacs.ca_file else None
        where = f"{self.pacs.ae_title}@{self.pacs.host}:{self.pacs.port}"
        assoc = ae.associate(self.pacs.host, self.pacs.port, ae_title=self.pacs.ae_title, tls_args=tls)
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            raise PacsUnavailable(f"{where} rejected the association (calling AE {self.calling_ae})")
        raise PacsUnavailable(f"{where} not reachable (connection refused, aborted or timed out)")

    def _send_one(self, assoc: Association, path: Path, sop_class: str, report: SendReport) -> None:
        if not assoc.is_established:
            raise PacsUnavailable("the PACS dropped the association")
        try:
            answer = assoc.send_c_store(path)
        except ValueError as exc:  # no accepted presentation context for this SOP class/syntax
            self._fail(path, f"the PACS accepts no presentation context for {sop_class}: {exc}", report)
            return
        status = answer.get("Status")
        if status is None:
            raise PacsUnavailable(f"no C-STORE response for {path.name} (association lost or timed out)")
        status = int(status)
        if status == 0x0000 or status in WARNINGS:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            report.sent.append(path.name)
            log.info("sent %s to PACS %s (status 0x%04X)", path.name, self.pacs.ae_title, status)
        elif _transient(status):
            raise PacsUnavailable(f"PACS answered 0x{status:04X} for {path.name}: out of resources / busy")
        else:
            comment = answer.get("ErrorComment", "")
            self._fail(path, f"PACS refused it: status 0x{status:04X} {comment}".strip(), report)

    def _fail(self, path: Path, reason: str, report: SendReport) -> None:
        dest = self.failed_dir / path.name
        shutil.move(path, dest)
        write_atomically(dest.with_name(dest.name + ".reason.txt"), (reason + "\n").encode())
        report.failed.append(path.name)
        log.error("DICOM result %s not sent: %s (kept in %s)", path.name, reason, self.failed_dir)

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
                self._wake.wait(timeout=60.0)  # rescan now and then, whatever wakes us
