"""DICOM networking: a C-STORE/C-ECHO receiver in front of the spool, a C-STORE sender to a PACS.

Both sides only ever expose complete files: a file is written under a temporary name, fsynced,
renamed, and its folder fsynced, so a crash leaves either nothing or the whole instance.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from appliance.errors import ConfigError
from appliance.ingest.uid_scan import valid_uid


def quiet_pynetdicom() -> None:
    """pynetdicom logs every association at INFO; our own lines say what matters on a cart."""
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def safe_uid_name(uid: str, suffix: str = ".dcm") -> str | None:
    """A file name from a UID, or None when the peer sent something that is not a UID."""
    uid = uid.strip()
    return f"{uid}{suffix}" if valid_uid(uid) else None


def server_tls_context(cert_file: Path, key_file: Path, ca_file: Path | None) -> ssl.SSLContext:
    """TLS for the receiver; with ca_file the sending unit must show a certificate signed by it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file)
        if ca_file is not None:
            context.load_verify_locations(cafile=ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"dicom_net.tls: cannot load {cert_file} / {key_file} / {ca_file}: {exc}") from exc
    return context


def client_tls_context(
    ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """TLS to the PACS, trusting ca_file; with cert_file/key_file the cart shows its own certificate."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
        if cert_file is not None and key_file is not None:
            context.load_cert_chain(cert_file, key_file)
        return context
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"dicom_out.pacs TLS files {ca_file} / {cert_file} / {key_file}: cannot load: {exc}"
        ) from exc
