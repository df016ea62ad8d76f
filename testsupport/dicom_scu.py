"""A real DICOM sender for tests: pynetdicom's SCU, as the X-ray unit would use it."""

from __future__ import annotations

import ssl
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

LOOPBACK = "127.0.0.1"


def _ae(calling: str) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def store(
    port: int,
    files: list[Path],
    *,
    calling: str = "XRAY_UNIT",
    called: str = "CXR_APPLIANCE",
    tls: ssl.SSLContext | None = None,
) -> list[int | None]:
    """C-STORE each file in one association; the statuses, or [] when the association was refused.

    None for a C-STORE that got no answer (the receiver aborted the association)."""
    ae = _ae(calling)
    contexts = set()
    for path in files:
        meta = read_file_meta_info(path)  # only the File Meta: a deflated dataset stays deflated
        contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(LOOPBACK, port, ae_title=called, tls_args=(tls, LOOPBACK) if tls else None)
    if not assoc.is_established:
        return []
    try:
        statuses: list[int | None] = []
        for path in files:
            answer = assoc.send_c_store(path)
            statuses.append(int(answer.Status) if "Status" in answer else None)
        return statuses
    finally:
        assoc.release()


def echo(port: int, *, calling: str = "XRAY_UNIT", called: str = "CXR_APPLIANCE") -> int | None:
    ae = _ae(calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()
