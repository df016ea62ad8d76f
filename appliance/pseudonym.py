"""Salted pseudonymous patient keys: the only patient identity that ever leaves the appliance.

key = HMAC-SHA256(salt, issuer + US + patient id), first 16 hex characters (64 bits: collisions
are negligible on one site, and the key cannot be reversed without the salt). The salt is a
secret random file created with mode 0600 on first use; keep it across upgrades, or every
patient's trend starts afresh. Different sites have different salts, so keys do not link sites.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from appliance.config import PrivacyConfig
from appliance.errors import ConfigError

log = logging.getLogger(__name__)

SALT_BYTES = 32
MIN_SALT_BYTES = 16
KEY_HEX_CHARS = 16
_SEPARATOR = "\x1f"  # ASCII unit separator: cannot occur in a DICOM LO value, so no ambiguity


def load_or_create_salt(path: Path, create: bool = True) -> bytes:
    """Read the salt; create it (0600, random) if missing and `create`. Raises ConfigError otherwise."""
    try:
        salt = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise ConfigError(f"privacy.salt_file {path}: missing") from None
        salt = _create_salt(path)
    except OSError as exc:
        raise ConfigError(f"privacy.salt_file {path}: cannot read: {exc.strerror}") from exc
    if len(salt) < MIN_SALT_BYTES:
        raise ConfigError(f"privacy.salt_file {path}: only {len(salt)} bytes, need at least {MIN_SALT_BYTES}")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("privacy.salt_file %s is readable by others (mode %o); chmod 600 it", path, mode & 0o777)
    return salt


def _create_salt(path: Path) -> bytes:
    salt = secrets.token_bytes(SALT_BYTES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: if two processes race, exactly one salt wins and the other reads it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"privacy.salt_file {path}: cannot create: {exc.strerror}") from exc
    try:
        os.write(fd, salt)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("created a new patient-key salt at %s", path)
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

    def __repr__(self) -> str:  # never show the salt
        return f"PatientKeys(ephemeral={self.ephemeral})"
