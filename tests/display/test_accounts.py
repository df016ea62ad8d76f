"""`cxr-appliance display-account`: the hash is the one mosquitto_passwd writes; files are replaced whole.
(The broker accepting and refusing these accounts: tests/deploy/test_broker_config.py.)"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.display.accounts import hash_password, list_accounts
from testsupport.mosquitto import MOSQUITTO_PASSWD


def test_the_hash_is_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwd), "u", "pä55 word"], check=True, capture_output=True)
    theirs = passwd.read_text().strip().split(":", 1)[1]
    salt = base64.b64decode(theirs.split("$")[3])
    assert hash_password("pä55 word", salt=salt) == theirs
    assert hash_password("pä55 word") != theirs  # a fresh random salt every time


def test_add_revoke_list_keep_modes_and_never_print_a_written_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passwd, acl, secret = tmp_path / "cxr.passwd", tmp_path / "cxr.acl", tmp_path / "kiosk.pw"
    acl.write_text("user cart-1\ntopic readwrite cxr/ward7/cart-1/#\n")
    acl.chmod(0o600)
    files = ["--passwd", str(passwd), "--acl", str(acl)]
    inode = acl.stat().st_ino
    assert (
        main(["display-account", "add", "kiosk", "--site", "ward7", "--password-file", str(secret), *files])
        == 0
    )
    assert main(["display-account", "add", "icu", "--site", "ward9", *files]) == 0
    out = capsys.readouterr().out
    assert secret.read_text().strip() not in out and "systemctl reload mosquitto" in out
    assert secret.stat().st_mode & 0o777 == 0o600
    assert acl.stat().st_mode & 0o777 == 0o600 and acl.stat().st_ino != inode  # replaced by a rename
    assert passwd.stat().st_mode & 0o777 == 0o640
    assert [(a.user, a.site) for a in list_accounts(passwd, acl)] == [
        ("display-kiosk", "ward7"),
        ("display-icu", "ward9"),
    ]
    assert main(["display-account", "revoke", "kiosk", *files]) == 0
    assert "display-kiosk" not in passwd.read_text() + acl.read_text()
    assert acl.read_text().startswith(
        "user cart-1\ntopic readwrite cxr/ward7/cart-1/#\n\n# display-account icu"
    )
    assert main(["display-account", "revoke", "kiosk", *files]) == 2  # nothing left to revoke: said plainly
    assert main(["display-account", "add", "display", "--site", "ward7", *files]) == 2  # the old shared name


def test_a_password_file_that_cannot_be_written_creates_no_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, the account was created first and its password, shown nowhere, was lost."""
    passwd, acl = tmp_path / "cxr.passwd", tmp_path / "cxr.acl"
    files = ["--passwd", str(passwd), "--acl", str(acl)]
    missing = tmp_path / "no-such-folder" / "kiosk.pw"
    assert (
        main(["display-account", "add", "kiosk", "--site", "ward7", "--password-file", str(missing), *files])
        == 2
    )
    assert "kiosk.pw: cannot write" in capsys.readouterr().err
    assert list_accounts(passwd, acl) == []


def test_a_failed_add_leaves_an_existing_password_file_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A display's live password file must never end up holding a password the broker never got."""
    live = tmp_path / "kiosk.pw"
    live.write_text("the-live-password\n")
    files = ["--passwd", str(tmp_path / "cxr.passwd"), "--acl", str(tmp_path / "cxr.acl")]
    # the old shared name: refused before any file is touched
    assert (
        main(["display-account", "add", "display", "--site", "ward7", "--password-file", str(live), *files])
        == 2
    )
    # the broker's files cannot be written (their folder is missing): the password file is put back
    elsewhere = [
        "--passwd",
        str(tmp_path / "gone" / "cxr.passwd"),
        "--acl",
        str(tmp_path / "gone" / "cxr.acl"),
    ]
    assert (
        main(["display-account", "add", "kiosk", "--site", "ward7", "--password-file", str(live), *elsewhere])
        == 2
    )
    assert "cannot write the broker's files" in capsys.readouterr().err
    assert live.read_text() == "the-live-password\n"
