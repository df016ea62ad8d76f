"""C-STORE SCP (and C-ECHO) so the X-ray unit can send images straight to the cart.

Each received instance is written as sent (no re-encoding) into a receive folder with
temp + fsync + rename, then handed to `Spool.accept(..., source="dicom-net")`: the same spool,
quarantine and SOPInstanceUID de-duplication as folder and USB input. The C-STORE response is
sent only after the spool holds the file, so a "Success" the unit sees is never lost. Files a
crash left in the receive folder are offered to the spool again at start.

Non-image objects a unit sends alongside its images (dose reports, presentation states) are
acknowledged and dropped: refusing them would make the unit flag the whole transfer as failed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from appliance.config import AppConfig, DicomNetConfig
from appliance.dicomnet import quiet_pynetdicom, safe_uid_name, server_tls_context
from appliance.durable import write_atomically
from appliance.errors import UserError
from appliance.ingest.spool import Accepted, Duplicate, Rejected, Spool, SpoolFull

log = logging.getLogger(__name__)

SOURCE = "dicom-net"

# C-STORE response statuses (PS3.4 Annex B / GG).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


class DicomReceiver:
    def __init__(
        self,
        config: DicomNetConfig,
        spool: Spool,
        receive_dir: Path,
        *,
        on_accepted: Callable[[], None] | None = None,
        accepting: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.spool = spool
        self.receive_dir = Path(receive_dir)
        self.on_accepted = on_accepted
        self.accepting = accepting
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()
        self.received = 0

    @classmethod
    def from_config(cls, config: AppConfig, spool: Spool, **kwargs: object) -> DicomReceiver:
        receive_dir = config.dicom_net.receive_dir or config.ingest.spool / "dicom-in"
        return cls(config.dicom_net, spool, receive_dir, **kwargs)  # type: ignore[arg-type]

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
        ae = AE(ae_title=self.config.ae_title)
        for context in AllStoragePresentationContexts:
            # Keep whatever compression the unit uses: the decoders read it, nothing is re-encoded.
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = [t.strip() for t in self.config.allowed_calling_ae]
        tls = self.config.tls
        ssl_context = server_tls_context(tls.cert_file, tls.key_file, tls.ca_file) if tls else None
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        try:
            self._server = ae.start_server(
                (self.config.bind, self.config.port),
                block=False,
                ssl_context=ssl_context,
                evt_handlers=handlers,
            )
        except OSError as exc:
            raise UserError(
                f"dicom_net: cannot listen on {self.config.bind}:{self.config.port}: {exc.strerror or exc}"
            ) from exc
        allowed = ", ".join(self.config.allowed_calling_ae) or "any"
        log.info(
            "DICOM receiver %s listening on %s:%d%s (calling AE titles: %s)",
            self.config.ae_title,
            *self.address,
            " with TLS" if tls else "",
            allowed,
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
        calling = requestor.ae_title.strip()
        allowed = [t.strip() for t in self.config.allowed_calling_ae]
        if allowed and calling not in allowed:
            why = (
                f"calling AE title {calling!r} is not in dicom_net.allowed_calling_ae ({', '.join(allowed)})"
            )
        else:
            why = f"calling AE title {calling!r} (too many associations or bad request)"
        log.warning("DICOM association from %s:%s refused: %s", requestor.address, requestor.port, why)

    def _on_store(self, event: Event) -> int:
        started = time.perf_counter()
        calling = event.assoc.requestor.ae_title.strip()
        sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        if not self.accepting():
            log.error("C-STORE %s from %s refused: the cart is not accepting images (disk)", sop_uid, calling)
            return OUT_OF_RESOURCES
        data = event.encoded_dataset(include_meta=True)
        if not _has_pixels(data):
            log.info(
                "C-STORE %s from %s: %s is not an image; acknowledged, not analysed",
                sop_uid,
                calling,
                getattr(event.request, "AffectedSOPClassUID", "?"),
            )
            return SUCCESS
        name = safe_uid_name(sop_uid) or f"noname-{time.time_ns()}.dcm"
        path = self.receive_dir / name
        try:
            write_atomically(path, data)
        except OSError as exc:
            log.error("C-STORE %s from %s: cannot write %s: %s", sop_uid, calling, path, exc.strerror or exc)
            return OUT_OF_RESOURCES
        status = self._hand_to_spool(path, calling)
        log.debug(
            "C-STORE %s from %s stored in %.1f ms", sop_uid, calling, (time.perf_counter() - started) * 1e3
        )
        return status

    # --- spool hand-off ------------------------------------------------------------------------------

    def _hand_to_spool(self, path: Path, calling: str) -> int:
        with self._lock:  # one rename at a time keeps the duplicate check simple for the spool
            try:
                outcome = self.spool.accept(path, SOURCE, move=True)
            except SpoolFull as exc:
                log.error("C-STORE from %s refused: %s", calling, exc)
                with contextlib.suppress(OSError):
                    path.unlink()
                return OUT_OF_RESOURCES
            except OSError as exc:
                log.error("C-STORE from %s: spool failed on %s: %s", calling, path.name, exc.strerror or exc)
                return OUT_OF_RESOURCES
        if isinstance(outcome, Rejected):
            log.warning("C-STORE from %s quarantined: %s (%s)", calling, outcome.reason, outcome.detail)
            return CANNOT_UNDERSTAND
        self.received += 1
        if isinstance(outcome, Accepted) and self.on_accepted is not None:
            self.on_accepted()
        elif isinstance(outcome, Duplicate):
            log.info("C-STORE from %s: already have %s", calling, outcome.key)
        return SUCCESS

    def _recover(self) -> None:
        for leftover in sorted(self.receive_dir.iterdir()):
            if leftover.name.endswith(".part"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            elif leftover.is_file():
                log.warning("DICOM receiver: %s was received before a stop; spooling it now", leftover.name)
                self._hand_to_spool(leftover, "")


def _has_pixels(data: bytes) -> bool:
    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=False, defer_size=256, force=True)
    except Exception:  # undecodable: let the spool quarantine it with its own reason
        return True
    return any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
