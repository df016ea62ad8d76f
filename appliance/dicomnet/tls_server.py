"""The receiver's association server: TLS handshakes in each connection's own thread, within a time limit.

pynetdicom's server wraps every accepted socket for TLS inside its one accept loop, and the handshake
there blocks without a time limit: one TCP connection that sends nothing (a port scan, a unit that hung)
stopped every later association, and `stop()` waited for it. Here the accept loop only accepts; the
handshake runs in the connection's thread (pynetdicom's ThreadingMixIn gives each one its own) and a
peer that has not finished it within HANDSHAKE_SECONDS is dropped with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from datetime import datetime
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 10.0


class HandshakeInThreadServer(ThreadedAssociationServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before the base class binds: a failed bind calls server_close(), which reads them.
        self._shaking: set[ssl.SSLSocket] = set()  # closed at server_close: stop() never waits for them
        self._shaking_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: tuple[str, int] | str
    ) -> None:
        if isinstance(request, ssl.SSLSocket):
            timeout = request.gettimeout()
            with self._shaking_lock:
                self._shaking.add(request)
            try:
                request.settimeout(HANDSHAKE_SECONDS)
                request.do_handshake()
                request.settimeout(timeout)
            except OSError as exc:  # ssl.SSLError, a timeout, a reset, closed at stop: this peer only
                host = client_address[0] if isinstance(client_address, tuple) else client_address
                log.warning("DICOM TLS handshake with %s not completed: %s; connection closed", host, exc)
                self.shutdown_request(request)
                return
            finally:
                with self._shaking_lock:
                    self._shaking.discard(request)
        super().process_request_thread(request, client_address)

    def server_close(self) -> None:
        with self._shaking_lock:
            for request in self._shaking:
                with contextlib.suppress(OSError):
                    request.shutdown(socket.SHUT_RDWR)
        super().server_close()


def start_server(ae: AE, address: tuple[str, int], **kwargs: Any) -> HandshakeInThreadServer:
    """As `AE.start_server(address, block=False, ...)`, with the server above."""
    server = ae.make_server(address, server_class=HandshakeInThreadServer, **kwargs)
    assert isinstance(server, HandshakeInThreadServer)
    ae._servers.append(server)  # as AE.start_server does: the server's shutdown() takes it out again
    name = f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}"
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server
