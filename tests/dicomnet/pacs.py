"""A PACS for tests: a real pynetdicom storage SCP on loopback that keeps what it receives.

It can be stopped and started again on the same port, as a PACS going down and coming back.
"""

from __future__ import annotations

import shutil
import ssl
from collections.abc import Sequence
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from testsupport.mosquitto import LOOPBACK, free_port


class Pacs:
    def __init__(
        self,
        folder: Path,
        *,
        ae_title: str = "PACS",
        status: int = 0x0000,
        transfer_syntaxes: Sequence[str] = ALL_TRANSFER_SYNTAXES,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.folder = folder
        self.ssl_context = ssl_context  # TLS only (a context requiring client certificates: mutual TLS)
        self.ae_title = ae_title
        self.transfer_syntaxes = list(transfer_syntaxes)  # what it accepts (e.g. uncompressed only)
        self.port = free_port()
        self.status = status  # what every C-STORE is answered with
        self.calling: list[str] = []
        self._server: ThreadedAssociationServer | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def _store(self, event: Event) -> int:
        self.calling.append(event.assoc.requestor.ae_title)
        if self.status == 0x0000:
            uid = getattr(event.request, "AffectedSOPInstanceUID", "unknown")
            dest = self.folder / f"{uid}.dcm"
            # A DicomReceiver started in this process switches pynetdicom to receiving into files.
            if _config.STORE_RECV_CHUNKED_DATASET:
                shutil.copyfile(event.dataset_path, dest)
            else:
                dest.write_bytes(event.encoded_dataset())
        return self.status

    def start(self) -> Pacs:
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), self.transfer_syntaxes)
        self._server = ae.start_server(
            (LOOPBACK, self.port),
            block=False,
            ssl_context=self.ssl_context,
            evt_handlers=[(evt.EVT_C_STORE, self._store)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def received(self) -> list[Path]:
        return sorted(self.folder.glob("*.dcm"))
