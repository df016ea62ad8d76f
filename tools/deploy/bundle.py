#!/usr/bin/env python3
"""Write one archive with everything a cart needs to install with no network at all.

    .venv/bin/cxr-bundle --out dist            # both targets (x86_64 and the Jetson)
    .venv/bin/cxr-bundle --out dist --target linux-x86_64-cp311
    sudo tools/install.sh --offline dist/cxr-appliance-0.1.0-bundle.tar.gz --site ward7 ...

Runs on a machine with PyPI; the cart needs nothing but the archive. Contents, below one top folder:

- wheels/<target>/: the appliance's own wheel (its ward display inside), every runtime dependency as a
  binary wheel for that target, and requirements.txt pinning each of them (dependencies come from
  pyproject.toml: no torch, no test tools);
- engines/<model>/ without training caches and checkpoints; systemd/ (units, udev rule, the
  Mosquitto drop-in, ACL and bridge examples); config/; tools/ (install.sh, build_engine.py); docs/;
- BUNDLE.json: versions, targets, creation time and the sha256 of every other file, which
  install.sh checks before it installs anything.

TensorRT and PyCUDA are not in the bundle: on a Jetson they come with JetPack and the venv sees
them through --system-site-packages.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[2]
FORMAT = 1
# Copied as they are (minus caches); engines/ is filtered separately.
TREES = ("systemd", "config", "tools", "docs")
FILES = ("README.md", "pyproject.toml")
# Training state and per-device build products: large, and useless or wrong on another machine.
MODEL_EXCLUDES = ("cache", "checkpoints", "*.engine", "*.timing.cache", "*.calib", "*.opt.onnx")
TREE_EXCLUDES = ("__pycache__", "*.pyc", ".mypy_cache", ".pytest_cache", ".ruff_cache", "node_modules")
JETPACK_NOTE = (
    "tensorrt and pycuda are not in this bundle: on a Jetson they come with JetPack "
    "(python3-libnvinfer, python3-pycuda) and the venv sees them through --system-site-packages. "
    "Without them the appliance runs on ONNX Runtime."
)


@dataclass(frozen=True)
class Target:
    """A machine the wheels are for: CPU architecture, CPython version, oldest glibc to support."""

    name: str
    machine: str
    python: tuple[int, int]
    glibc: tuple[int, int]
    note: str

    @property
    def cp(self) -> str:
        return f"cp{self.python[0]}{self.python[1]}"

    def platforms(self) -> list[str]:
        # pip does not widen an explicit --platform to older glibc versions: name every one.
        major, newest = self.glibc
        tags = [f"manylinux_{major}_{minor}_{self.machine}" for minor in range(newest, 16, -1)]
        return [*tags, f"manylinux2014_{self.machine}"]

    def environment(self) -> dict[str, str]:
        """PEP 508 marker values on the target, to check dependencies as the cart will see them."""
        version = f"{self.python[0]}.{self.python[1]}"
        return {
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "platform_machine": self.machine,
            "platform_system": "Linux",
            "sys_platform": "linux",
            "os_name": "posix",
            "python_version": version,
            "python_full_version": f"{version}.0",
            "implementation_version": f"{version}.0",
        }


TARGETS = {
    t.name: t
    for t in (
        Target(
            "linux-x86_64-cp311",
            "x86_64",
            (3, 11),
            (2, 35),
            "x86_64 PC, Debian 12 / Ubuntu 22.04+, Python 3.11",
        ),
        Target(
            "linux-aarch64-cp310",
            "aarch64",
            (3, 10),
            (2, 35),
            "Jetson Orin, JetPack 6 (Ubuntu 22.04), Python 3.10",
        ),
    )
}


class BundleError(Exception):
    pass


def say(message: str) -> None:
    print(f"bundle: {message}", flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip(*args: str) -> None:
    # pip's own lines (Collecting / Downloading / Saved) are the progress output.
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args])
    if proc.returncode != 0:
        raise BundleError(f"pip {args[0]} failed (exit {proc.returncode}); see its output above")


def appliance_pyproject(text: str) -> str:
    """pyproject.toml for the cart's wheel, which holds `appliance` alone: without the console scripts
    of the `tools` package (cxr-train, cxr-bench, ...), which would be commands that cannot start."""
    tool_script = re.compile(r'^[\w-]+\s*=\s*"tools\.')
    return "".join(line for line in text.splitlines(keepends=True) if not tool_script.match(line))


def build_project_wheel(dest: Path, scratch: Path) -> Path:
    """The appliance's wheel, built from a clean copy so stale build/ folders cannot leak into it."""
    source = scratch / "source"
    source.mkdir()
    for name in FILES:
        shutil.copy2(REPO / name, source / name)
    (source / "pyproject.toml").write_text(appliance_pyproject((REPO / "pyproject.toml").read_text()))
    shutil.copytree(REPO / "appliance", source / "appliance", ignore=shutil.ignore_patterns(*TREE_EXCLUDES))
    pip("wheel", "--no-deps", "--wheel-dir", str(dest), str(source))
    wheels = list(dest.glob("cxr_appliance-*.whl"))
    if len(wheels) != 1:
        raise BundleError(f"expected one cxr_appliance wheel in {dest}, found {wheels}")
    return wheels[0]


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(archive.read(name).decode("utf-8"))


def requirements(wheel: Path) -> list[Requirement]:
    return [Requirement(line) for line in wheel_metadata(wheel).get_all("Requires-Dist") or []]


def applies(req: Requirement, env: dict[str, str], extras: Iterable[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in (*extras, ""))


def missing_requirements(folder: Path, target: Target) -> list[str]:
    """Requirements, evaluated on the target, that no wheel in folder satisfies.

    pip evaluates markers such as python_version against the interpreter that runs it, not the
    target, so the set it downloads for another Python may lack something; this says what."""
    env = target.environment()
    found: dict[str, tuple[str, Path]] = {}
    for wheel in folder.glob("*.whl"):
        dist, version, _, _ = parse_wheel_filename(wheel.name)
        found[canonicalize_name(dist)] = (str(version), wheel)
    wanted: dict[str, set[str]] = {canonicalize_name("cxr-appliance"): set()}
    missing: list[str] = []
    queue = [canonicalize_name("cxr-appliance")]
    while queue:
        name = queue.pop()
        wheel = found[name][1]
        requires_python = wheel_metadata(wheel).get("Requires-Python")
        if requires_python and not SpecifierSet(requires_python).contains(env["python_full_version"]):
            raise BundleError(f"{target.name}: {wheel.name} needs Python {requires_python}")
        for req in requirements(wheel):
            if not applies(req, env, wanted[name]):
                continue
            dep = canonicalize_name(req.name)
            if dep not in found or not req.specifier.contains(found[dep][0], prereleases=True):
                missing.append(str(req))
                continue
            if dep not in wanted or not set(req.extras) <= wanted[dep]:
                wanted[dep] = wanted.get(dep, set()) | set(req.extras)
                queue.append(dep)
    return sorted(set(missing))


def download(target: Target, reqs: Sequence[str], dest: Path) -> None:
    platform_args = [arg for tag in target.platforms() for arg in ("--platform", tag)]
    pip(
        "download", "--only-binary=:all:", "--dest", str(dest), *platform_args,
        "--python-version", f"{target.python[0]}.{target.python[1]}", "--implementation", "cp",
        "--abi", target.cp, *reqs,
    )  # fmt: skip


LOCK = REPO / "requirements" / "runtime.lock"


def locked_for(target: Target, lock: Path = LOCK) -> list[str]:
    """The lock's pins (with their hashes) whose markers hold on the target: what the cart must get."""
    joined = lock.read_text().replace("\\\n", " ")
    lines = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, _, hashes = line.partition(" --hash")
        req = Requirement(spec.strip())
        if req.marker is None or req.marker.evaluate(target.environment()):
            lines.append(f"{req.name}{req.specifier} --hash{hashes}")
    return lines


def wheels_for(target: Target, project_wheel: Path, dest: Path) -> list[dict[str, str]]:
    dest.mkdir(parents=True)
    shutil.copy2(project_wheel, dest / project_wheel.name)
    # Exactly the locked versions, hashes checked by pip: the cart gets what was tested. By name, never
    # the project: a same-named package on PyPI must not be fetched.
    pinned = dest.parent / f"{target.name}.lock.txt"
    pinned.write_text("\n".join(locked_for(target)) + "\n")
    download(target, ["--require-hashes", "--no-deps", "-r", str(pinned)], dest)
    pinned.unlink()
    for _ in range(3):  # add what pip left out because it judged markers by this interpreter
        missing = missing_requirements(dest, target)
        if not missing:
            break
        say(f"{target.name}: also needed on the target: {', '.join(missing)}")
        download(target, missing, dest)
    if missing:
        raise BundleError(f"{target.name}: the wheel set is incomplete: {'; '.join(missing)}")
    pins = []
    for wheel in sorted(dest.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        pins.append({"name": str(name), "version": str(version), "file": wheel.name})
    (dest / "requirements.txt").write_text(
        f"# Every wheel of {target.name}, pinned: the cart gets exactly these versions.\n"
        + "".join(f"{p['name']}=={p['version']}\n" for p in pins)
    )
    return pins


def copy_tree(src: Path, dest: Path, excludes: Sequence[str]) -> None:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(*excludes), symlinks=False)


def model_info(folder: Path) -> dict[str, str]:
    import yaml

    data = yaml.safe_load((folder / "manifest.yaml").read_text()) or {}
    return {
        "folder": f"engines/{folder.name}",
        "name": str(data.get("name")),
        "version": str(data.get("version")),
    }


def write_bundle(out: Path, targets: Sequence[Target]) -> Path:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    top = f"cxr-appliance-{version}"
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"{top}-bundle.tar.gz"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cxr-bundle-", dir=out) as tmp:
        scratch, stage = Path(tmp), Path(tmp) / top
        stage.mkdir()
        say("building the appliance wheel")
        project_wheel = build_project_wheel(scratch / "project", scratch)
        pins = {}
        for i, target in enumerate(targets, 1):
            say(f"[{i}/{len(targets)}] downloading wheels for {target.name} ({target.note})")
            pins[target.name] = wheels_for(target, project_wheel, stage / "wheels" / target.name)
        say("copying the model, units, broker configuration, config examples, tools and docs")
        for name in TREES:
            copy_tree(REPO / name, stage / name, TREE_EXCLUDES)
        for name in FILES:
            shutil.copy2(REPO / name, stage / name)
        models = [
            model_info(m) for m in sorted((REPO / "engines").iterdir()) if (m / "manifest.yaml").is_file()
        ]
        for model in models:
            copy_tree(REPO / model["folder"], stage / model["folder"], (*TREE_EXCLUDES, *MODEL_EXCLUDES))
        files = {str(p.relative_to(stage)): sha256(p) for p in sorted(stage.rglob("*")) if p.is_file()}
        manifest = {
            "format": FORMAT,
            "name": "cxr-appliance",
            "version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "built_with": {"python": platform.python_version(), "machine": platform.machine()},
            "targets": {
                t.name: {
                    "machine": t.machine,
                    "python": f"{t.python[0]}.{t.python[1]}",
                    "glibc_min": f"{t.glibc[0]}.{t.glibc[1]}",
                    "note": t.note,
                    "wheels": f"wheels/{t.name}",
                    "packages": pins[t.name],
                }
                for t in targets
            },
            "models": models,
            "not_included": JETPACK_NOTE,
            "files": files,
        }
        (stage / "BUNDLE.json").write_text(json.dumps(manifest, indent=2) + "\n")
        say(f"writing {archive} ({len(files)} files)")
        partial = archive.with_suffix(".partial")
        with tarfile.open(partial, "w:gz", compresslevel=6) as tar:
            tar.add(stage, arcname=top, filter=_normalise)
        partial.replace(archive)
    digest = sha256(archive)
    # Beside the archive, to compare with what arrives on the stick (sha256sum -c).
    archive.with_name(archive.name + ".sha256").write_text(f"{digest}  {archive.name}\n")
    size = archive.stat().st_size / 1e6
    say(f"done in {time.monotonic() - started:.0f} s: {archive} {size:.0f} MB sha256 {digest}")
    return archive


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Nobody's user names in the archive; install.sh decides ownership.
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "dist", help="folder for the archive (default dist/)"
    )
    parser.add_argument(
        "--target", action="append", choices=sorted(TARGETS),
        help="wheel set to include (repeatable; default: all)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    targets = [TARGETS[name] for name in args.target or TARGETS]
    try:
        write_bundle(args.out, targets)
    except BundleError as exc:
        print(f"bundle: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
