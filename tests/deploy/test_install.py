"""tools/install.sh into a temporary root, twice: everything is created once and never overwritten."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import load_config

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "tools" / "install.sh"
SITE, DEVICE = "ward7", "cart-3"


def install(root: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [
        "bash", str(INSTALL), "--root", str(root), "--no-systemctl", "--skip-venv", "--skip-doctor",
        "--python", sys.executable, "--site", SITE, "--device-id", DEVICE, *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file install.sh writes outside the application copy."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != "opt"
    }


def openssl(*args: str) -> str:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    install(root)
    return root


def test_creates_folders_config_and_units(root: Path) -> None:
    etc, state = root / "etc/cxr-appliance", root / "var/lib/cxr-appliance"
    for folder in (etc, etc / "secrets", state / "inbox", state / "spool"):
        assert folder.is_dir(), folder
    assert (etc / "secrets").stat().st_mode & 0o007 == 0
    config = load_config(etc / "config.yaml")  # the real schema: unknown keys or bad values fail here
    assert (config.device.site, config.device.device_id) == (SITE, DEVICE)
    assert config.mqtt.port == 8883 and config.mqtt.username == DEVICE
    assert config.mqtt.tls is not None and config.mqtt.tls.ca_file == etc / "ca.crt"
    password = config.mqtt.password()
    assert password is not None and len(password.get_secret_value()) >= 20
    assert config.ingest.spool == state / "spool"
    prefix = root / "opt/cxr-appliance"
    assert (prefix / "appliance" / "config.py").is_file()
    assert not (prefix / ".git").exists() and not (prefix / ".venv").exists()
    for unit in ("cxr-appliance.service", "cxr-engine-build.service", "cxr-usb-import@.service"):
        text = (root / "etc/systemd/system" / unit).read_text()
        assert f"{prefix}/.venv/bin/" in text and "/opt/cxr-appliance/" not in text.replace(str(prefix), "")
    assert (root / "etc/udev/rules.d/99-cxr-usb.rules").is_file()
    assert (root / "etc/sysusers.d/cxr-appliance.conf").read_text().count("cxr") >= 2


def test_broker_password_file_acl_and_dropin(root: Path) -> None:
    mosq = root / "etc/mosquitto"
    entries = dict(line.split(":", 1) for line in (mosq / "cxr.passwd").read_text().splitlines())
    # No shared display account: the cart's own screen has its own, like every other display.
    assert set(entries) == {DEVICE, "display-kiosk"}
    assert all(h.startswith("$7$") for h in entries.values())  # hashed, never the plain password
    assert (mosq / "cxr.passwd").stat().st_mode & 0o077 == 0o040
    acl = (mosq / "cxr.acl").read_text()
    assert f"user {DEVICE}\ntopic readwrite cxr/{SITE}/{DEVICE}/#" in acl
    assert (
        f"user display-kiosk\ntopic read cxr/{SITE}/#\ntopic write cxr/{SITE}/+/ack/+/display-kiosk\n"
        f"topic write cxr/{SITE}/+/history/request\n"
    ) in acl
    assert "\nuser display\n" not in acl and "cxr/+/+/ack" not in acl
    config = load_config(root / "etc/cxr-appliance/config.yaml")
    secret = config.display.password()
    assert (config.display.site, config.display.username) == (SITE, "display-kiosk")
    assert secret is not None and config.display.password_file is not None
    assert config.display.password_file.stat().st_mode & 0o077 == 0o040
    dropin = (mosq / "conf.d/cxr.conf").read_text()
    assert f"password_file {mosq}/cxr.passwd" in dropin
    settings = [line for line in dropin.replace(str(mosq), "ROOT").splitlines() if not line.startswith("#")]
    assert not [line for line in settings if "/etc/" in line]


def test_self_signed_ca_and_server_certificate(root: Path) -> None:
    ca = root / "etc/mosquitto/certs/cxr-ca.crt"
    server = root / "etc/mosquitto/certs/cxr-server.crt"
    assert openssl("verify", "-CAfile", str(ca), str(server)).strip().endswith("OK")
    text = openssl("x509", "-in", str(server), "-noout", "-text")
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text
    assert "TLS Web Server Authentication" in text
    assert (root / "etc/cxr-appliance/ca.crt").read_bytes() == ca.read_bytes()
    # The CA key is root's alone: not in the service's secrets/ (group cxr), never beside the broker.
    key = root / "etc/cxr-appliance/ca-private/cxr-ca.key"
    assert key.stat().st_mode & 0o077 == 0 and key.parent.stat().st_mode & 0o077 == 0
    assert not list((root / "etc/mosquitto").rglob("*ca.key"))
    assert not list((root / "etc/cxr-appliance/secrets").glob("*ca.key"))


def test_the_ca_is_name_constrained_to_the_broker(root: Path) -> None:
    ca = root / "etc/mosquitto/certs/cxr-ca.crt"
    text = openssl("x509", "-in", str(ca), "-noout", "-text")
    assert "X509v3 Name Constraints: critical" in text
    permitted = text.split("Permitted:", 1)[1].split("X509v3", 1)[0]
    assert "DNS:localhost" in permitted and "IP:127.0.0.1/255.255.255.255" in permitted
    assert "Excluded" not in text and "pathlen:0" in text
    # A certificate for any other name, signed by the same CA key, does not verify.
    key = root / "etc/cxr-appliance/ca-private/cxr-ca.key"
    other_key, csr, other = (root.parent / f"other.{suffix}" for suffix in ("key", "csr", "crt"))
    ext = root.parent / "other.ext"
    ext.write_text("subjectAltName=DNS:intranet.hospital.example\nbasicConstraints=CA:FALSE\n")
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(other_key))
    openssl("req", "-new", "-key", str(other_key), "-subj", "/CN=intranet.hospital.example", "-out", str(csr))
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(key),
        "-set_serial",
        "2",
        "-days",
        "1",
        "-extfile",
        str(ext),
        "-out",
        str(other),
    )
    check = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca), str(other)], capture_output=True, text=True
    )
    assert check.returncode != 0 and "permitted subtree violation" in check.stderr


def test_second_run_changes_nothing(root: Path) -> None:
    before = digests(root)
    proc = install(root)
    assert digests(root) == before
    assert "created" not in proc.stdout and "wrote" not in proc.stdout


def test_existing_secrets_and_edited_config_are_left_alone(tmp_path: Path) -> None:
    install(tmp_path)
    etc = tmp_path / "etc/cxr-appliance"
    config = etc / "config.yaml"
    config.write_text(config.read_text().replace("location: unassigned", "location: ICU bed 4"))
    edited = config.read_bytes()
    (etc / "secrets/mqtt-cart.password").write_text("a-password-the-engineer-chose\n")
    server = tmp_path / "etc/mosquitto/certs/cxr-server.crt"
    ca_before = (tmp_path / "etc/mosquitto/certs/cxr-ca.crt").read_bytes()
    passwd_before = (tmp_path / "etc/mosquitto/cxr.passwd").read_bytes()
    server.unlink()  # a lost server certificate is re-issued by the same CA

    install(tmp_path)
    assert config.read_bytes() == edited
    assert (etc / "secrets/mqtt-cart.password").read_text() == "a-password-the-engineer-chose\n"
    assert (tmp_path / "etc/mosquitto/cxr.passwd").read_bytes() == passwd_before
    assert (tmp_path / "etc/mosquitto/certs/cxr-ca.crt").read_bytes() == ca_before
    ca = tmp_path / "etc/mosquitto/certs/cxr-ca.crt"
    assert openssl("verify", "-CAfile", str(ca), str(server)).strip().endswith("OK")


def test_the_old_shared_display_account_is_removed(tmp_path: Path) -> None:
    """An install from before per-display accounts: `display`, whose password every browser got."""
    install(tmp_path)
    mosq, secrets = tmp_path / "etc/mosquitto", tmp_path / "etc/cxr-appliance/secrets"
    with (mosq / "cxr.passwd").open("a") as f:
        f.write("display:$7$101$AAAAAAAAAAAAAAAA$" + "A" * 86 + "==\n")
    with (mosq / "cxr.acl").open("a") as f:
        f.write(
            "\n# Ward displays: read every cart\nuser display\ntopic read cxr/#\ntopic write cxr/+/+/ack/+\n"
        )
    (secrets / "mqtt-display.password").write_text("old-public-password\n")
    kiosk = (mosq / "cxr.passwd").read_text().split("display-kiosk:")[1].split("\n")[0]

    proc = install(tmp_path)
    assert "removed the old shared broker account 'display'" in proc.stdout
    passwd, acl = (mosq / "cxr.passwd").read_text(), (mosq / "cxr.acl").read_text()
    assert "\ndisplay:" not in "\n" + passwd and "\nuser display\n" not in acl and "cxr/+/+/ack" not in acl
    assert f"display-kiosk:{kiosk}" in passwd  # the kiosk's account is left as it was
    assert f"user {DEVICE}\n" in acl and "user display-kiosk\n" in acl
    assert not (secrets / "mqtt-display.password").exists()
    assert (mosq / "cxr.passwd").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device-id", "cart/1"], "--device-id 'cart/1'"),
        (["--device-id", "display"], "reserved"),
        (["--frobnicate"], "unknown option --frobnicate"),
    ],
)
def test_bad_options_are_refused_plainly(tmp_path: Path, args: list[str], message: str) -> None:
    proc = install(tmp_path, *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "etc/cxr-appliance/config.yaml").exists()
