"""Salted pseudonymous patient keys: the only patient identity that ever leaves the appliance.

key = HMAC-SHA256(salt, issuer + US + patient id), first 16 hex characters (64 bits: collisions
are negligible on one site, and the key cannot be reversed without the salt). The salt is a
secret random file created with mode 0600 on first use; keep it across upgrades, or every
patient's trend starts afresh. Different sites have different salts, so keys do not link sites.

The issuer is the DICOM IssuerOfPatientID (0010,0021): the same number from two issuers is two
patients. The published image id is keyed by the same salt (`image_id_secret`, a separate derived
key), so it cannot be recomputed from the SOP Instance UID by anyone with PACS access.
A salt file that group or others may read is refused: the salt is what keeps the keys pseudonymous.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from appliance.config import AppConfig, PrivacyConfig
from appliance.durable import fsync_dir
from appliance.errors import ConfigError

log = logging.getLogger(__name__)

SALT_BYTES = 32
MIN_SALT_BYTES = 16
KEY_HEX_CHARS = 16
_SEPARATOR = "\x1f"  # ASCII unit separator: cannot occur in a DICOM LO value, so no ambiguity


def load_or_create_salt(path: Path, create: bool = True, *, what: str = "privacy.salt_file") -> bytes:
    """Read the salt; create it (0600, random) if missing and `create`. Raises ConfigError otherwise.

    `what` names the file in errors (the spool keeps a key of its own the same way)."""
    try:
        salt = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise ConfigError(f"{what} {path}: missing") from None
        salt = _create_salt(path, what)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror}") from exc
    if len(salt) < MIN_SALT_BYTES:
        raise ConfigError(f"{what} {path}: only {len(salt)} bytes, need at least {MIN_SALT_BYTES}")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{what} {path}: group or others have access (mode {mode & 0o777:o}); chmod 600 it")
    return salt


def _create_salt(path: Path, what: str) -> bytes:
    """Write a whole salt under a temporary name, then link it into place: a crash never leaves a
    short or empty salt behind, and if two processes race exactly one salt wins (link fails on the other)."""
    salt = secrets.token_bytes(SALT_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, salt)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # unlike rename, never replaces a salt another process made first
        except FileExistsError:
            return path.read_bytes()
        fsync_dir(path.parent)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot create: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    log.info("created a new secret for %s at %s", what, path)
    return salt


class PatientKeys:
    """Turns (patient id, issuer) into the salted pseudonym; holds the salt in memory only."""

    def __init__(self, salt: bytes, *, ephemeral: bool = False) -> None:
        if len(salt) < MIN_SALT_BYTES:
            raise ValueError(f"salt too short ({len(salt)} bytes)")
        self._salt = salt
        self.ephemeral = ephemeral

    @classmethod
    def from_config(
        cls, config: PrivacyConfig, *, create: bool = True, ephemeral_ok: bool = False
    ) -> PatientKeys:
        """`ephemeral_ok`: if the salt file cannot be read or made, use a random in-memory salt
        (keys then differ from the daemon's; fine for a one-off `process` run, never for the daemon)."""
        try:
            return cls(load_or_create_salt(config.salt_file, create=create))
        except ConfigError as exc:
            if not ephemeral_ok:
                raise
            log.warning("%s; using a throw-away salt: patient keys will not match the daemon's", exc)
            return cls(secrets.token_bytes(SALT_BYTES), ephemeral=True)

    def key(self, patient_id: str | None, issuer: str | None = None) -> str | None:
        """The pseudonym, or None when the image carries no usable patient id."""
        pid = (patient_id or "").strip()
        if not pid:
            return None
        message = f"{(issuer or '').strip()}{_SEPARATOR}{pid}".encode()
        return hmac.new(self._salt, message, hashlib.sha256).hexdigest()[:KEY_HEX_CHARS]

    def image_id_secret(self) -> bytes:
        """The key for image ids (appliance.ingest.spool): derived, so an image id and a patient key
        never come from the same HMAC key."""
        return hmac.new(self._salt, b"cxr-appliance image id", hashlib.sha256).digest()

    def __repr__(self) -> str:  # never show the salt
        return f"PatientKeys(ephemeral={self.ephemeral})"


def image_id_secret(config: AppConfig) -> bytes:
    """The spool's image-id key from the site salt (created if missing, as the daemon does)."""
    return PatientKeys.from_config(config.privacy).image_id_secret()
