"""A PACS for tests: a real pynetdicom storage SCP on loopback that keeps what it receives.

It can be stopped and started again on the same port, as a PACS going down and coming back.
"""

from __future__ import annotations

from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from tests.support.mosquitto import LOOPBACK, free_port


class Pacs:
    def __init__(self, folder: Path, *, ae_title: str = "PACS", status: int = 0x0000) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self.status = status  # what every C-STORE is answered with
        self.calling: list[str] = []
        self._server: ThreadedAssociationServer | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def _store(self, event: Event) -> int:
        self.calling.append(event.assoc.requestor.ae_title)
        if self.status == 0x0000:
            uid = getattr(event.request, "AffectedSOPInstanceUID", "unknown")
            (self.folder / f"{uid}.dcm").write_bytes(event.encoded_dataset())
        return self.status

    def start(self) -> Pacs:
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        self._server = ae.start_server(
            (LOOPBACK, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def received(self) -> list[Path]:
        return sorted(self.folder.glob("*.dcm"))
