"""The receiver's association server: TLS handshakes in each connection's own thread, within a time limit.

pynetdicom's server wraps every accepted socket for TLS inside its one accept loop, and the handshake
there blocks without a time limit: one TCP connection that sends nothing (a port scan, a unit that hung)
stopped every later association, and `stop()` waited for it. So pynetdicom is given no SSL context, and
the web endpoints' TlsServerMixin (appliance/websecurity.py) shakes hands in the connection's thread
(pynetdicom's ThreadingMixIn gives each one its own) and drops a peer that has not finished in time.
"""

from __future__ import annotations

import logging
import ssl
import threading
from datetime import datetime
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from appliance.websecurity import TlsServerMixin

log = logging.getLogger(__name__)


class HandshakeInThreadServer(TlsServerMixin, ThreadedAssociationServer):
    def handshake_failed(self, client_address: Any, exc: OSError) -> None:
        host = client_address[0] if isinstance(client_address, tuple) else client_address
        log.warning("DICOM TLS handshake with %s not completed: %s; connection closed", host, exc)


def start_server(
    ae: AE, address: tuple[str, int], *, ssl_context: ssl.SSLContext | None = None, **kwargs: Any
) -> HandshakeInThreadServer:
    """As `AE.start_server(address, block=False, ssl_context=..., ...)`, with the server above."""
    server = ae.make_server(address, server_class=HandshakeInThreadServer, **kwargs)
    assert isinstance(server, HandshakeInThreadServer)
    server.tls_context = ssl_context
    ae._servers.append(server)  # as AE.start_server does: the server's shutdown() takes it out again
    name = f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}"
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server
