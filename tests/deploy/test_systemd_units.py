"""The shipped systemd units: `systemd-analyze verify` on each, and the properties issue 8 asks for."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
UNITS = ["cxr-appliance.service", "cxr-engine-build.service", "cxr-usb-import@.service"]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def parse_unit(path: Path) -> dict[str, list[str]]:
    """'Section.Key' -> every value given (systemd allows repeated keys), continuation lines joined."""
    out: dict[str, list[str]] = {}
    section = ""
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(unit: dict[str, list[str]], key: str) -> str:
    values = unit.get(key)
    assert values, f"{key} missing"
    return values[-1]


@pytest.fixture(scope="module")
def installed_units(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units as install.sh would rewrite them for a prefix whose executables exist here.

    verify checks that every Exec* command is executable, so the prefix holds the venv's real
    python and a real program standing in for the `cxr-appliance` entry point.
    """
    root = tmp_path_factory.mktemp("units")
    prefix = root / "opt"
    (prefix / ".venv" / "bin").mkdir(parents=True)
    (prefix / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (prefix / ".venv" / "bin" / "cxr-appliance").symlink_to(sys.executable)
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text().replace("/opt/cxr-appliance", str(prefix))
        (root / unit).write_text(text)
    # A template is verified through an instance, as udev would start it.
    shutil.copy(root / "cxr-usb-import@.service", root / "cxr-usb-import@sdb1.service")
    return root


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)")
@pytest.mark.parametrize(
    "unit", ["cxr-appliance.service", "cxr-engine-build.service", "cxr-usb-import@sdb1.service"]
)
def test_systemd_analyze_verify_is_clean(installed_units: Path, unit: str) -> None:
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(installed_units / unit)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=installed_units,
    )
    # Warnings (an unknown key, a bad value) only go to stderr with rc 0: treat them as failures too.
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


MAX_EXPOSURE = 2.0  # the review's target for every unit


def exposure(unit_path: Path) -> float:
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(unit_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=unit_path.parent,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    return float(found.group(1))


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)")
@pytest.mark.parametrize(
    "unit", ["cxr-appliance.service", "cxr-engine-build.service", "cxr-usb-import@sdb1.service"]
)
def test_every_unit_is_exposed_at_most_2(installed_units: Path, unit: str) -> None:
    assert exposure(installed_units / unit) <= MAX_EXPOSURE


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_the_exposure_check_can_fail(installed_units: Path) -> None:
    """Without the sandboxing lines the same unit scores far above the bound."""
    text = (installed_units / "cxr-appliance.service").read_text()
    stripped = installed_units / "loose.service"
    keep = ("ExecStart=", "Type=", "[Unit]", "[Service]", "[Install]", "Description=", "User=", "Group=")
    stripped.write_text("\n".join(line for line in text.splitlines() if line.startswith(keep)) + "\n")
    assert exposure(stripped) > MAX_EXPOSURE


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_verify_catches_a_broken_unit(installed_units: Path) -> None:
    """The check above can fail: a misspelt Type= is reported."""
    assert SYSTEMD_ANALYZE is not None
    broken = installed_units / "broken.service"
    text = (installed_units / "cxr-appliance.service").read_text()
    broken.write_text(text.replace("Type=notify", "Type=notfy"))
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(broken)], capture_output=True, text=True
    )
    assert "Failed to parse service type" in proc.stderr
    assert "not executable" not in proc.stderr  # only the misspelling, nothing else


def test_appliance_unit_is_notify_watchdog_restart_and_hardened_without_breaking_cuda() -> None:
    unit = parse_unit(SYSTEMD / "cxr-appliance.service")
    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.NotifyAccess") == "main"
    assert one(unit, "Service.WatchdogSec")
    assert one(unit, "Service.Restart") == "on-failure"
    assert int(one(unit, "Unit.StartLimitBurst")) >= 2
    assert one(unit, "Unit.StartLimitIntervalSec")
    assert one(unit, "Service.User") == "cxr"
    assert "video" in one(unit, "Service.SupplementaryGroups").split()
    assert one(unit, "Service.ExecStart").endswith(
        "cxr-appliance run --config /etc/cxr-appliance/config.yaml"
    )
    assert one(unit, "Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "Service.StateDirectory") == "cxr-appliance"
    assert one(unit, "Service.ConfigurationDirectory") == "cxr-appliance"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert one(unit, f"Service.{key}") == value, key
    assert "/var/lib/cxr-appliance" in one(unit, "Service.ReadWritePaths")
    # These would hide /dev/nvidia* and /dev/nvhost-* or forbid CUDA's JIT.
    assert "Service.PrivateDevices" not in unit
    assert "Service.MemoryDenyWriteExecute" not in unit
    assert "Service.DevicePolicy" not in unit
    assert "Service.PrivateUsers" not in unit  # would drop the video group the GPU nodes need
    assert unit["Service.SystemCallFilter"][0] == "@system-service"
    assert one(unit, "Service.SystemCallErrorNumber") == "EPERM"  # a denied call fails, never kills
    assert one(unit, "Service.ProtectProc") == "invisible"
    # The engine build runs first but a failed build must not block the ONNX Runtime fallback.
    assert "cxr-engine-build.service" in one(unit, "Unit.After")
    assert "cxr-engine-build.service" not in " ".join(unit.get("Unit.Requires", []))


def test_engine_build_is_a_oneshot_before_the_appliance() -> None:
    unit = parse_unit(SYSTEMD / "cxr-engine-build.service")
    assert one(unit, "Service.Type") == "oneshot"
    assert one(unit, "Unit.Before") == "cxr-appliance.service"
    assert one(unit, "Service.ExecStart") == (
        "/opt/cxr-appliance/.venv/bin/python -m tools.engines.build_engine"
        " --config /etc/cxr-appliance/config.yaml --if-needed"
        " --check-parity --parity-data /var/lib/cxr-appliance/parity"
    )
    # `-m` finds the `tools` package in the application folder, not in the venv.
    assert one(unit, "Service.WorkingDirectory") == "/opt/cxr-appliance"
    assert (REPO / "tools" / "engines" / "build_engine.py").is_file()
    assert "Service.PrivateDevices" not in unit


def test_usb_rule_starts_the_import_template_which_mounts_read_only() -> None:
    rule = (SYSTEMD / "99-cxr-usb.rules").read_text()
    joined = re.sub(r"\\\n", " ", rule)
    [line] = [x for x in joined.splitlines() if x.strip() and not x.lstrip().startswith("#")]
    assert 'ACTION=="add"' in line and 'SUBSYSTEM=="block"' in line and 'ENV{ID_BUS}=="usb"' in line
    assert 'TAG+="systemd"' in line
    wanted = re.search(r'ENV\{SYSTEMD_WANTS\}\+="([^"]+)"', line)
    assert wanted and wanted.group(1) == "cxr-usb-import@%k.service"
    unit = parse_unit(SYSTEMD / "cxr-usb-import@.service")
    mount = one(unit, "Service.ExecStartPre")
    assert mount.startswith("+/usr/bin/systemd-mount --no-block")
    options = re.search(r"--options=(\S+)", mount)
    assert options and "ro" in options.group(1).split(",")
    assert one(unit, "Service.ExecStart").split()[1:3] == ["usb-import", "--config"]
    assert one(unit, "Service.User") == "cxr"
    assert one(unit, "Unit.BindsTo") == "dev-%i.device"
