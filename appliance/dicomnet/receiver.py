"""C-STORE SCP (and C-ECHO) so the X-ray unit can send images straight to the cart.

Who may send: only the calling AE titles in dicom_net.allowed_calling_ae (it must not be empty), only
to our own called AE title, on dicom_net.bind (loopback unless an address is configured), over TLS
when dicom_net.tls is given.

pynetdicom streams each dataset to a temporary file (never into memory); past ingest.max_file_mb the
association is aborted. The instance is then copied as sent (no re-encoding) into a receive folder with
temp + fsync + rename, and handed to the intake (appliance/ingest/intake.py) under its NETWORK rules:
the same gate, size limit, quarantine, metrics and de-duplication as folder and USB input, plus the
check the reader makes before decoding. The C-STORE response is sent only after the spool holds the
file, so a "Success" the unit sees is never lost, and never given for a file the reader would refuse
unread. Files a crash left in the receive folder are offered to the intake again at start.

Only the image storage SOP classes the reader handles are taken; any other object (a dose report, a
presentation state) is refused with "SOP Class not supported" without its data being parsed. Deflated
transfer syntaxes are not negotiated (a few MB of deflate inflate to gigabytes): a unit proposing one
next to an uncompressed syntax gets the uncompressed one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, JPIPHTJ2KReferencedDeflate
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from appliance.config import AppConfig, DicomNetConfig
from appliance.dicomnet import quiet_pynetdicom, safe_uid_name, server_tls_context
from appliance.dicomnet.tls_server import start_server
from appliance.durable import copy_atomically
from appliance.errors import UserError
from appliance.ingest.intake import NETWORK, Intake, Outcome, Verdict, as_intake
from appliance.ingest.spool import Spool
from appliance.logs import printable

log = logging.getLogger(__name__)

SOURCE = "dicom-net"

# C-STORE response statuses (PS3.4 Annex B / GG, PS3.7 Annex C).
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

# Radiographs as the reader takes them: grey, one frame read. Anything else never reaches the spool.
IMAGE_SOP_CLASSES = frozenset(
    str(uid)
    for uid in (
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
        SecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    )
)
# Whole-dataset deflate (and JPIP's, and the frame-level kind): ~1000:1 on zeros, so never negotiated.
_DEFLATED = {
    DeflatedExplicitVRLittleEndian,
    UID("1.2.840.10008.1.2.4.95"),  # JPIP Referenced Deflate
    JPIPHTJ2KReferencedDeflate,
    UID("1.2.840.10008.1.2.8.1"),  # Deflated Image Frame Compression
}
TRANSFER_SYNTAXES = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _DEFLATED]
# The answer to each intake outcome. SKIPPED cannot happen under NETWORK rules (non-images are
# quarantined); it is here so that every outcome has an answer.
STATUS = {
    Verdict.ACCEPTED: SUCCESS,
    Verdict.DUPLICATE: SUCCESS,  # a unit retrying: it has been delivered
    Verdict.QUARANTINED: CANNOT_UNDERSTAND,
    Verdict.SKIPPED: CANNOT_UNDERSTAND,
    Verdict.DEFERRED: OUT_OF_RESOURCES,  # the unit sends it again later
}


class DicomReceiver:
    def __init__(
        self,
        config: DicomNetConfig,
        intake: Intake | Spool,
        receive_dir: Path,
        *,
        on_accepted: Callable[[], None] | None = None,
    ) -> None:
        """`intake` brings the gate and the limits (ingest.max_file_mb caps the stream too); a bare
        Spool gets an Intake with the default limits."""
        self.config = config
        self.intake = as_intake(intake)
        self.receive_dir = Path(receive_dir)
        self.on_accepted = on_accepted
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()
        self._arriving: dict[Association, int] = {}  # dataset bytes of the C-STORE in transfer
        self.received = 0

    @classmethod
    def from_config(
        cls, config: AppConfig, intake: Intake | Spool, *, on_accepted: Callable[[], None] | None = None
    ) -> DicomReceiver:
        receive_dir = config.dicom_net.receive_dir or config.ingest.spool / "dicom-in"
        if isinstance(intake, Spool):
            intake = Intake.from_config(config, intake)
        return cls(config.dicom_net, intake, receive_dir, on_accepted=on_accepted)

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> DicomReceiver:
        """Offer leftovers from a crash to the spool, then listen (pynetdicom's server thread)."""
        try:
            self.receive_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"dicom_net receive folder {self.receive_dir}: cannot create: {exc.strerror}"
            ) from exc
        self._recover()
        quiet_pynetdicom()
        # Datasets go to a temporary file as they arrive, not into memory (process-wide, receiving only).
        _config.STORE_RECV_CHUNKED_DATASET = True
        ae = AE(ae_title=self.config.ae_title)
        for context in AllStoragePresentationContexts:
            # Keep whatever compression the unit uses: the decoders read it, nothing is re-encoded.
            # Every storage class is negotiated so that a non-image gets a refusal status, not a
            # rejected context the unit may report less clearly.
            ae.add_supported_context(str(context.abstract_syntax), TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        allowed = [t.strip() for t in self.config.allowed_calling_ae if t.strip()]
        if not allowed:  # pynetdicom reads an empty list as "anyone": never run that way
            raise UserError("dicom_net.allowed_calling_ae is empty: list the X-ray units' AE titles")
        ae.require_calling_aet = allowed
        # A unit configured for another node (a PACS title, a typo) is told so, not silently stored.
        ae.require_called_aet = True
        tls = self.config.tls
        ssl_context = server_tls_context(tls.cert_file, tls.key_file, tls.ca_file) if tls else None
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        try:
            self._server = start_server(
                ae, (self.config.bind, self.config.port), ssl_context=ssl_context, evt_handlers=handlers
            )
        except OSError as exc:
            raise UserError(
                f"dicom_net: cannot listen on {self.config.bind}:{self.config.port}: {exc.strerror or exc}"
            ) from exc
        log.info(
            "DICOM receiver %s listening on %s:%d%s (calling AE titles: %s)",
            self.config.ae_title,
            *self.address,
            " with TLS" if tls else "",
            ", ".join(allowed),
        )
        return self

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        """Stop listening; associations in progress are finished or aborted by pynetdicom."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log.info("DICOM receiver stopped after %d instance(s)", self.received)

    def __enter__(self) -> DicomReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- events ------------------------------------------------------------------------------------

    def _on_echo(self, event: Event) -> int:
        requestor = event.assoc.requestor
        log.info("C-ECHO from %s (%s:%s)", requestor.ae_title, requestor.address, requestor.port)
        return SUCCESS

    def _on_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        calling = printable(requestor.ae_title.strip())
        primitive = requestor.primitive
        called = printable(str(getattr(primitive, "called_ae_title", "") or "").strip())
        allowed = [t.strip() for t in self.config.allowed_calling_ae]
        if calling not in allowed:
            why = (
                f"calling AE title {calling!r} is not in dicom_net.allowed_calling_ae ({', '.join(allowed)})"
            )
        elif called != self.config.ae_title.strip():
            why = f"called AE title {called!r} is not ours ({self.config.ae_title.strip()})"
        else:
            why = f"calling AE title {calling!r} (too many associations or bad request)"
        log.warning("DICOM association from %s:%s refused: %s", requestor.address, requestor.port, why)

    def _on_pdu(self, event: Event) -> None:
        """Count the dataset bytes of the C-STORE arriving (in the association's reader thread) and
        abort past max_bytes: pynetdicom would write whatever comes to its temporary file."""
        if not isinstance(event.pdu, P_DATA_TF):
            return
        assoc = event.assoc
        before = total = self._arriving.get(assoc, 0)
        for item in event.pdu.presentation_data_value_items:
            value = item.presentation_data_value or b""
            if value[:1] and value[0] & 1:  # a command fragment: the next message begins
                before = total = 0
            else:
                total += max(0, len(value) - 1)  # less the message control header
        self._arriving[assoc] = total
        max_bytes = self.intake.max_bytes  # the intake's size limit, applied while the data streams in
        if total > max_bytes >= before:
            requestor = assoc.requestor
            log.error(
                "C-STORE from %s (%s:%s) aborted: the dataset is over %g MB (ingest.max_file_mb)",
                requestor.ae_title.strip(),
                requestor.address,
                requestor.port,
                max_bytes / 2**20,
            )
            assoc.abort(block=False)  # this is the reader thread: a blocking abort would wait on itself

    def _on_close(self, event: Event) -> None:
        self._arriving.pop(event.assoc, None)
        # pynetdicom leaves the temporary file of a transfer cut short (aborted, cable pulled) behind.
        message = getattr(event.assoc.dimse, "message", None)
        partial = getattr(message, "_data_set_file", None)
        if partial is not None:
            with contextlib.suppress(OSError):
                partial.close()
                os.unlink(partial.name)

    def _on_store(self, event: Event) -> int:
        started = time.perf_counter()
        calling = event.assoc.requestor.ae_title.strip()
        sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        sop_class = UID(str(getattr(event.request, "AffectedSOPClassUID", "") or ""))
        if sop_class not in IMAGE_SOP_CLASSES:
            # Decided from the request, before the data is parsed: a dose report or an SR is refused
            # as such, and nothing it holds (a deflated payload) is ever inflated.
            log.warning(
                "C-STORE %s from %s refused: %s is not an image the cart analyses",
                sop_uid,
                calling,
                sop_class.name or "(no SOP class)",
            )
            return SOP_CLASS_NOT_SUPPORTED
        # The intake's gate, asked before the dataset is written: while the disk is full, not a byte more.
        why = self.intake.not_accepting()
        if why:
            log.error(
                "C-STORE %s from %s refused: the cart is not accepting images (%s)", sop_uid, calling, why
            )
            return OUT_OF_RESOURCES
        name = safe_uid_name(sop_uid) or f"noname-{time.time_ns()}.dcm"
        path = self.receive_dir / name
        try:
            copy_atomically(event.dataset_path, path)
        except OSError as exc:
            log.error("C-STORE %s from %s: cannot write %s: %s", sop_uid, calling, path, exc.strerror or exc)
            return OUT_OF_RESOURCES
        status = self._answer(self._offer(path), path, calling)
        log.debug(
            "C-STORE %s from %s stored in %.1f ms", sop_uid, calling, (time.perf_counter() - started) * 1e3
        )
        return status

    # --- intake hand-off -----------------------------------------------------------------------------

    def _offer(self, path: Path) -> Outcome:
        with self._lock:  # one hand-off at a time: two copies of one instance share a receive file name
            return self.intake.offer(path, SOURCE, NETWORK)

    def _answer(self, outcome: Outcome, path: Path, calling: str) -> int:
        if outcome.verdict is Verdict.DEFERRED:
            # The unit is told to send it again: keep nothing it believes was not delivered.
            with contextlib.suppress(OSError):
                path.unlink()
            log.error("C-STORE from %s refused: %s", calling, outcome.reason)
        elif outcome.verdict in (Verdict.QUARANTINED, Verdict.SKIPPED):
            log.warning("C-STORE from %s refused: %s (%s)", calling, outcome.reason, outcome.detail)
        else:
            self.received += 1
            if outcome.verdict is Verdict.ACCEPTED and self.on_accepted is not None:
                self.on_accepted()
            elif outcome.verdict is Verdict.DUPLICATE:
                log.info("C-STORE from %s: already have %s", calling, outcome.key)
        return STATUS[outcome.verdict]

    def _recover(self) -> None:
        for leftover in sorted(self.receive_dir.iterdir()):
            if leftover.name.endswith(".part"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            elif leftover.is_file():
                log.warning("DICOM receiver: %s was received before a stop; spooling it now", leftover.name)
                # Never answered: on DEFERRED it stays here for the next start (the unit may not resend).
                self._offer(leftover)
