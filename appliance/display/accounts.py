"""Broker accounts for ward displays: one per display (`display-<name>`), each separately revocable.

The page hands its broker password to every browser that loads it, so a display's account may do no
more than read its own site and acknowledge: its ACL block reads `<prefix>/<site>/#` and writes only
`<prefix>/<site>/+/ack/+/display-<name>` (its own ack topic per result, so it cannot overwrite or clear
another display's ack) and `<prefix>/<site>/+/history/request`.

`cxr-appliance display-account add|revoke|list` edits Mosquitto's password file and ACL directly:
the password hash is written here (Mosquitto 2's `$7$` PBKDF2-SHA512, as `mosquitto_passwd` writes it),
so no password ever appears in a process's argv, and both files are replaced atomically (temp file +
rename) keeping their mode and owner. Mosquitto re-reads both only on SIGHUP (`systemctl reload
mosquitto`); until then a revoked display can still log in.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import re
import secrets
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import UserError

DEFAULT_PASSWD = Path("/etc/mosquitto/cxr.passwd")
DEFAULT_ACL = Path("/etc/mosquitto/cxr.acl")
USER_PREFIX = "display-"
# The shared account of installs before per-display accounts: `revoke display` removes it.
LEGACY_USER = "display"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
# What mosquitto_passwd 2.0 writes: `$7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>`.
HASH_ITERATIONS = 101
SALT_BYTES = 12
NEW_FILE_MODE = 0o640  # root:mosquitto on a real install, as tools/install.sh makes them


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = HASH_ITERATIONS) -> str:
    """A Mosquitto 2 password-file hash of `password` (what `mosquitto_passwd -b` would write)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def user_for(name: str) -> str:
    """The broker account of display `name` (`kiosk` -> `display-kiosk`; `display-kiosk` stays)."""
    if name == LEGACY_USER:
        return LEGACY_USER
    short = name.removeprefix(USER_PREFIX)
    if not _NAME.match(short):
        raise UserError(f"display name {name!r}: use 1-40 letters, digits, '-' and '_'")
    return USER_PREFIX + short


def ack_topic_filter(prefix: str, site: str, user: str) -> str:
    """Where `user` may write acks: one topic per result and display, so none can touch another's."""
    return f"{prefix}/{site}/+/ack/+/{user}"


def acl_block(name: str, site: str, prefix: str = "cxr") -> str:
    user = user_for(name)
    if not _NAME.match(site):
        raise UserError(f"--site {site!r}: use letters, digits, '-' and '_' (one topic level)")
    return (
        f"# display-account {user.removeprefix(USER_PREFIX)} (site {site}): managed by"
        " `cxr-appliance display-account`; reads its site, acknowledges only as itself.\n"
        f"user {user}\n"
        f"topic read {prefix}/{site}/#\n"
        f"topic write {ack_topic_filter(prefix, site, user)}\n"
        f"topic write {prefix}/{site}/+/history/request\n"
    )


# -- files ---------------------------------------------------------------------------------------
def write_atomic(path: Path, text: str, mode: int = NEW_FILE_MODE) -> None:
    """Replace `path` in one rename; an existing file's mode and owner carry over to the new one."""
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # Before a byte is written: the temp file is never readable by more than the target is.
        os.fchmod(fd, st.st_mode & 0o7777 if st else mode)
        if st is not None and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, st.st_uid, st.st_gid)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from exc


def _join(lines: list[str]) -> str:
    return "\n".join(lines).strip("\n") + "\n" if any(line.strip() for line in lines) else ""


def set_password(passwd: Path, user: str, password: str) -> None:
    """Add or replace `user` in a Mosquitto password file."""
    lines = [line for line in _read_lines(passwd) if not line.startswith(f"{user}:")]
    write_atomic(passwd, _join([*lines, f"{user}:{hash_password(password)}"]))


def _acl_spans(lines: list[str]) -> Iterator[tuple[str, int, int]]:
    """(user, start, end) of each `user` block, its comment lines just above it included."""
    heads: list[tuple[str, int]] = []
    for i, line in enumerate(lines):
        if line.startswith("user "):
            start = i
            while start > 0 and lines[start - 1].lstrip().startswith("#"):
                start -= 1
            heads.append((line.split(None, 1)[1].strip(), start))
    for n, (user, start) in enumerate(heads):
        yield user, start, heads[n + 1][1] if n + 1 < len(heads) else len(lines)


def _without_user(lines: list[str], user: str) -> tuple[list[str], bool]:
    spans = [(s, e) for u, s, e in _acl_spans(lines) if u == user]
    for start, end in reversed(spans):
        lines = [*lines[:start], *lines[end:]]
    return lines, bool(spans)


@dataclass(frozen=True)
class DisplayAccount:
    user: str
    site: str | None  # from its `topic read <prefix>/<site>/#` line; None for the legacy account
    has_password: bool


def list_accounts(passwd: Path, acl: Path) -> list[DisplayAccount]:
    lines = _read_lines(acl)
    users = {line.split(":", 1)[0] for line in _read_lines(passwd) if ":" in line}
    found: list[DisplayAccount] = []
    for user, start, end in _acl_spans(lines):
        if user != LEGACY_USER and not user.startswith(USER_PREFIX):
            continue
        reads = [
            ln.split()[2] for ln in lines[start:end] if ln.startswith("topic read ") and len(ln.split()) == 3
        ]
        site = reads[0].split("/")[1] if reads and reads[0].count("/") >= 2 else None
        found.append(DisplayAccount(user, None if user == LEGACY_USER else site, user in users))
    return found


def new_account_user(name: str) -> str:
    """The broker user of a new display account; never the old shared one."""
    user = user_for(name)
    if user == LEGACY_USER:
        raise UserError("'display' is the old shared account: give this display its own name")
    return user


def add(
    name: str, site: str, passwd: Path, acl: Path, prefix: str = "cxr", password: str | None = None
) -> str:
    """Create (or replace, with a new password) display `name`'s account; returns its new password
    (`password`, or a new random one)."""
    user = new_account_user(name)
    block = acl_block(name, site, prefix)
    password = password or secrets.token_urlsafe(24)
    lines, _ = _without_user(_read_lines(acl), user)
    # The ACL first: a password without its ACL block could log in and be denied everything, never more.
    write_atomic(acl, _join([*lines, "", *block.splitlines()]))
    set_password(passwd, user, password)
    return password


def revoke(name: str, passwd: Path, acl: Path) -> bool:
    """Remove display `name`'s password and ACL block; False when neither was there."""
    user = user_for(name)
    old = _read_lines(passwd)
    kept = [line for line in old if not line.startswith(f"{user}:")]
    if kept != old:
        write_atomic(passwd, _join(kept))
    lines, had_block = _without_user(_read_lines(acl), user)
    if had_block:
        write_atomic(acl, _join(lines))
    return had_block or kept != old


# -- the command line --------------------------------------------------------------------------------
def reload_broker(args: argparse.Namespace) -> str:
    """Make Mosquitto re-read the files (SIGHUP), or say that someone must."""
    if args.reload_pid is not None:
        try:
            os.kill(args.reload_pid, signal.SIGHUP)
        except OSError as exc:
            raise UserError(f"--reload-pid {args.reload_pid}: {exc.strerror}") from exc
        return f"sent SIGHUP to mosquitto (pid {args.reload_pid}): it re-reads the password file and ACL"
    if args.reload:
        proc = subprocess.run(["systemctl", "reload", "mosquitto.service"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"systemctl reload mosquitto failed: {proc.stderr.strip()}")
        return "reloaded mosquitto (SIGHUP): it re-reads the password file and ACL"
    return (
        "the broker still uses the old files until it re-reads them: run `sudo systemctl reload mosquitto`"
        " (SIGHUP) now"
    )


def _add_with_password_file(args: argparse.Namespace, password: str) -> None:
    """The password file first (an account whose password was never written down is lost), 0600 from
    its first byte; put back as it was when the account then cannot be made (a display's live password
    file must not end up holding a password the broker never got)."""
    path: Path = args.password_file
    try:
        before = path.read_text(encoding="utf-8") if path.exists() else None
        write_atomic(path, password + "\n", mode=0o600)
    except OSError as exc:
        raise UserError(f"--password-file {path}: cannot write: {exc.strerror}") from exc
    try:
        add(args.name, args.site, args.passwd, args.acl, args.topic_prefix, password=password)
    except BaseException:
        with contextlib.suppress(OSError):
            if before is None:
                path.unlink()
            else:
                write_atomic(path, before)
        raise


def main(args: argparse.Namespace) -> int:
    action = args.account_command
    if action == "list":
        for account in list_accounts(args.passwd, args.acl):
            note = "" if account.has_password else "  (no password: cannot log in)"
            where = "OLD SHARED ACCOUNT: revoke it" if account.user == LEGACY_USER else f"site {account.site}"
            print(f"{account.user}  {where}{note}")
        return 0
    if action == "add":
        password = secrets.token_urlsafe(24)
        user = new_account_user(args.name)  # before any file is touched
        try:
            if args.password_file is None:
                add(args.name, args.site, args.passwd, args.acl, args.topic_prefix, password=password)
            else:
                _add_with_password_file(args, password)
        except OSError as exc:
            raise UserError(
                f"cannot write the broker's files {args.passwd}, {args.acl}: {exc.strerror}"
            ) from exc
        if args.password_file is not None:
            print(
                f"created broker account {user} (site {args.site}); its password is in {args.password_file}"
            )
        else:
            print(f"created broker account {user} (site {args.site}); its password (shown only now):")
            print(password)
        print(
            f"display config: site: {args.site}, username: {user},"
            f" password_file: <a file holding the password, mode 0600>"
        )
    else:
        if not revoke(args.name, args.passwd, args.acl):
            raise UserError(f"no display account {user_for(args.name)} in {args.passwd} or {args.acl}")
        print(f"revoked broker account {user_for(args.name)}")
    print(reload_broker(args))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="account_command", required=True)

    def files(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--passwd", type=Path, default=DEFAULT_PASSWD, help=f"default {DEFAULT_PASSWD}")
        p.add_argument("--acl", type=Path, default=DEFAULT_ACL, help=f"default {DEFAULT_ACL}")
        return p

    def reload(p: argparse.ArgumentParser) -> None:
        how = p.add_mutually_exclusive_group()
        how.add_argument("--reload", action="store_true", help="systemctl reload mosquitto afterwards")
        how.add_argument("--reload-pid", type=int, help="send SIGHUP to this mosquitto process afterwards")

    p = files(sub.add_parser("add", help="a new display account (a new password if it exists)"))
    p.add_argument("name", help="the display's name; its account is display-NAME")
    p.add_argument("--site", required=True, help="the only site (ward) it may read and acknowledge")
    p.add_argument("--topic-prefix", default="cxr", help="mqtt.topic_prefix of the carts (default cxr)")
    p.add_argument(
        "--password-file", type=Path, help="write the password here (mode 0600) instead of printing it"
    )
    reload(p)
    p = files(sub.add_parser("revoke", help="remove a display account ('display': the old shared one)"))
    p.add_argument("name")
    reload(p)
    files(sub.add_parser("list", help="display accounts and their sites"))
