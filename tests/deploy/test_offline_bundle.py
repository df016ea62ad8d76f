"""An offline field install: tools/deploy/bundle.py writes one archive; tools/install.sh --offline installs it
inside a network namespace with no network; then the real `doctor` (with the installed broker
configuration on a real Mosquitto) and one real DICOM through ONNX Runtime.

Needs root (unshare/nsenter) and PyPI for building the bundle; pip's downloads are cached in the
pytest cache, so a rerun builds the bundle in well under a minute.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testsupport.data import real_dicoms
from testsupport.mosquitto import MOSQUITTO
from tools.deploy.bundle import TARGETS, missing_requirements, sha256

REPO = Path(__file__).resolve().parents[2]
SITE, DEVICE = "ward7", "cart-3"
HERE = "linux-x86_64-cp311"  # this machine's target, the one the namespace install uses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    out = tmp_path_factory.mktemp("dist")
    cache = request.config.cache
    assert cache is not None
    env = {**os.environ, "PIP_CACHE_DIR": str(cache.mkdir("offline-bundle-pip"))}
    proc = subprocess.run(
        [sys.executable, "-m", "tools.deploy.bundle", "--out", str(out)],
        capture_output=True, text=True, timeout=1200, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"downloading wheels for {HERE}" in proc.stdout  # progress is reported
    (archive,) = out.glob("cxr-appliance-*-bundle.tar.gz")
    return archive


@pytest.fixture(scope="module")
def unpacked(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(bundle) as tar:
        tar.extractall(dest, filter="data")
    (top,) = dest.iterdir()
    return top


def manifest(top: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((top / "BUNDLE.json").read_text())
    return data


def install_command(archive: Path, root: Path) -> list[str]:
    return [
        "bash", str(REPO / "tools/install.sh"), "--offline", str(archive), "--root", str(root), "--no-systemctl",
        "--skip-doctor", "--python", sys.executable, "--site", SITE, "--device-id", DEVICE,
    ]  # fmt: skip


def repack(top: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(top, arcname=top.name)
    return archive


def refused(archive: Path, tmp_path: Path) -> str:
    """install.sh's error output for a bundle it must refuse before installing anything."""
    root = tmp_path / "root"
    proc = subprocess.run(install_command(archive, root), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "nothing was installed" in proc.stderr and "Traceback" not in proc.stderr
    assert not (root / "opt/cxr-appliance/.venv").exists() and not (root / "etc/cxr-appliance").exists()
    return proc.stderr


def test_manifest_covers_every_file_and_both_targets(bundle: Path, unpacked: Path) -> None:
    data = manifest(unpacked)
    on_disk = {str(p.relative_to(unpacked)) for p in unpacked.rglob("*") if p.is_file()} - {"BUNDLE.json"}
    assert set(data["files"]) == on_disk
    assert all(sha256(unpacked / name) == digest for name, digest in data["files"].items())
    assert set(data["targets"]) == set(TARGETS)
    assert "tensorrt" in data["not_included"] and "JetPack" in data["not_included"]
    for target in data["targets"].values():
        names = {p["name"] for p in target["packages"]}
        assert {"cxr-appliance", "onnxruntime", "numpy", "pydicom", "paho-mqtt"} <= names
        assert not names & {"torch", "pytest", "mypy", "ruff", "tensorrt", "pycuda"}
    arm = " ".join(p["file"] for p in data["targets"]["linux-aarch64-cp310"]["packages"])
    assert "cp310-cp310-manylinux" in arm and "x86_64" not in arm
    # The model and everything around it, without training state; a size that fits a USB stick.
    assert {"engines/cxr-lite0/model.onnx", "engines/cxr-lite0/manifest.yaml", "tools/install.sh",
            "systemd/cxr-appliance.service", "systemd/mosquitto/cxr.conf", "config/example.yaml"} <= on_disk  # fmt: skip
    assert not [n for n in on_disk if "/checkpoints/" in n or "/cache/" in n or n.endswith(".pt")]
    assert bundle.stat().st_size < 400e6
    digest = (bundle.parent / f"{bundle.name}.sha256").read_text().split()[0]
    assert digest == sha256(bundle)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_each_wheel_set_is_complete_for_its_target(unpacked: Path, target: str, tmp_path: Path) -> None:
    wheels = unpacked / "wheels" / target
    assert missing_requirements(wheels, TARGETS[target]) == []
    # The check can fail: without onnxruntime's wheel the set is incomplete, and it says so.
    partial = tmp_path / target
    shutil.copytree(wheels, partial, ignore=shutil.ignore_patterns("onnxruntime-*"))
    assert [m for m in missing_requirements(partial, TARGETS[target]) if m.startswith("onnxruntime")]


class Namespace:
    """A network namespace with no network (only lo, down), held open by a sleeping process."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd  # never the checkout: `python -c` would import the appliance from there
        if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
            pytest.fail("this test needs root with unshare and nsenter (util-linux)")
        self.holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
        mine = os.readlink("/proc/self/ns/net")
        for _ in range(100):  # unshare has created the namespace once the holder's differs from ours
            if os.readlink(f"/proc/{self.holder.pid}/ns/net") != mine:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        else:
            pytest.fail("unshare --net did not create a namespace")

    def run(
        self, *cmd: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.holder.pid), "-n", *cmd],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=self.cwd,
        )  # fmt: skip

    def popen(self, *cmd: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["nsenter", "-t", str(self.holder.pid), "-n", *cmd], cwd=self.cwd)

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[Namespace]:
    ns = Namespace(cwd=tmp_path)
    yield ns
    ns.close()


def test_offline_install_then_doctor_and_one_real_image(
    bundle: Path, netns: Namespace, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    prefix, etc = root / "opt/cxr-appliance", root / "etc/cxr-appliance"
    config = etc / "config.yaml"

    links = netns.run("ip", "-o", "link", "show").stdout.splitlines()
    assert len(links) == 1 and ": lo:" in links[0] and "state DOWN" in links[0], links
    probe = netns.run(sys.executable, "-c", "import socket; socket.create_connection(('pypi.org', 443), 5)")
    assert probe.returncode != 0 and "gaierror" in probe.stderr  # not even a name lookup works

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    install = netns.run(
        *install_command(bundle, root), timeout=900, env={**os.environ, "TMPDIR": str(scratch)}
    )
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]
    assert "bundle verified" in install.stdout
    assert not (prefix / "wheels").exists() and (prefix / "engines/cxr-lite0/model.onnx").is_file()
    assert (prefix / "BUNDLE.json").is_file()
    assert not list(scratch.iterdir())  # the unpacked bundle is cleaned up

    # Every pinned package is in the venv itself, at the bundle's version (never the OS's copy).
    pins = {p["name"]: p["version"] for p in manifest_of(bundle)["targets"][HERE]["packages"]}
    venv_py = str(prefix / ".venv/bin/python")
    where = netns.run(venv_py, "-c", (
        "import importlib.metadata as m, json, sys; "
        "print(json.dumps({n: [m.version(n), str(m.distribution(n).locate_file(''))] for n in sys.argv[1:]}))"
    ), *pins)  # fmt: skip
    assert where.returncode == 0, where.stderr
    found = json.loads(where.stdout)
    assert {n: v for n, (v, _) in found.items()} == pins
    outside = {n: where for n, (_, where) in found.items() if not where.startswith(str(prefix / ".venv"))}
    assert not outside
    display = list((prefix / ".venv/lib").glob("python3.*/site-packages/appliance/display/index.html"))
    assert display, "the ward display did not come with the appliance wheel"

    # The installed broker configuration, unchanged, on a real Mosquitto inside the namespace.
    assert netns.run("ip", "link", "set", "lo", "up").returncode == 0
    (root / "var/lib/mosquitto").mkdir(parents=True)
    main_conf = root / "etc/mosquitto/mosquitto.conf"
    main_conf.write_text(  # Debian's main file, pointing into the staging root
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\npersistence true\n"
        f"persistence_location {root}/var/lib/mosquitto/\nlog_dest file {root}/mosquitto.log\n"
        f"include_dir {root}/etc/mosquitto/conf.d\n"
    )
    broker = netns.popen(MOSQUITTO, "-c", str(main_conf))
    try:
        up = netns.run(
            "bash",
            "-c",
            "for _ in $(seq 100); do (: </dev/tcp/127.0.0.1/8883) 2>/dev/null && exit 0; sleep 0.1; done; exit 1",
        )
        assert up.returncode == 0, (root / "mosquitto.log").read_text(errors="replace")

        doctor = netns.run(str(prefix / ".venv/bin/cxr-appliance"), "doctor", "--config", str(config))
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "READY: 0 failed" in doctor.stdout
        assert [line for line in doctor.stdout.splitlines() if "broker" in line and "OK" in line]

        image = real_dicoms()[0]
        processed = netns.run(
            str(prefix / ".venv/bin/cxr-appliance"), "process", "--config", str(config), "--json", str(image)
        )
        assert processed.returncode == 0, processed.stdout + processed.stderr
        result = json.loads(processed.stdout.splitlines()[-1])
        assert result["status"] == "ok", result
        assert result["provenance"]["model"] == "cxr-lite0"
        assert result["provenance"]["backend"].startswith("onnxruntime"), result["provenance"]
    finally:
        broker.terminate()
        broker.wait(timeout=10)


def test_a_tampered_bundle_is_refused_and_the_file_named(unpacked: Path, tmp_path: Path) -> None:
    top = tmp_path / unpacked.name
    shutil.copytree(unpacked, top)
    victim = next((top / "wheels" / HERE).glob("onnxruntime-*.whl"))
    with victim.open("r+b") as handle:  # one flipped byte in the middle of a wheel
        handle.seek(victim.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    stderr = refused(repack(top, tmp_path / "tampered.tar.gz"), tmp_path)
    assert f"wheels/{HERE}/{victim.name} does not match its sha256" in stderr


def test_a_bundle_without_wheels_for_this_machine_says_what_it_has(unpacked: Path, tmp_path: Path) -> None:
    top = tmp_path / unpacked.name
    shutil.copytree(unpacked, top)
    data = manifest(top)
    del data["targets"][HERE]  # a Jetson-only bundle arriving at an x86_64 cart
    (top / "BUNDLE.json").write_text(json.dumps(data))
    stderr = refused(repack(top, tmp_path / "jetson-only.tar.gz"), tmp_path)
    assert "no wheels for this machine: x86_64 with Python 3.11" in stderr
    assert "the bundle has aarch64 with Python 3.10" in stderr


def manifest_of(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/BUNDLE.json"))
        handle = tar.extractfile(member)
        assert handle is not None
        data: dict[str, Any] = json.load(handle)
    return data
