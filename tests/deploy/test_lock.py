"""requirements/runtime.lock: every runtime dependency pinned with hashes, inside pyproject's bounds
(which sit above the versions with known CVEs), and the very versions this test run uses."""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "runtime.lock"


def locked() -> dict[str, list[tuple[str, str, list[str]]]]:
    """name -> [(version, marker, hashes)]: one package may be pinned differently per Python."""
    text = re.sub(r"\\\n\s*", " ", LOCK.read_text())
    pins: dict[str, list[tuple[str, str, list[str]]]] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec = line.partition(" --hash")[0]
        requirement = Requirement(spec.strip())
        [pin] = list(requirement.specifier)
        assert pin.operator == "==", line
        hashes = re.findall(r"sha256:[0-9a-f]{64}", line)
        marker = str(requirement.marker) if requirement.marker else ""
        pins.setdefault(canonicalize_name(requirement.name), []).append((pin.version, marker, hashes))
    return pins


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def pin_for_this_python(entries: list[tuple[str, str, list[str]]]) -> str | None:
    for pinned, marker, _ in entries:
        if not marker or Marker(marker).evaluate():
            return pinned
    return None


def test_every_pin_has_hashes_and_every_runtime_dependency_is_pinned() -> None:
    pins = locked()
    assert len(pins) >= 20
    for name, entries in pins.items():
        for pinned, _, hashes in entries:
            assert hashes, f"{name}=={pinned} has no --hash"
    for requirement in runtime_requirements():
        assert canonicalize_name(requirement.name) in pins, f"{requirement.name} is not in the lock"


def test_pins_respect_the_lower_bounds_of_pyproject() -> None:
    """The bounds in pyproject.toml are the CVE floors (named beside each); the lock may not undercut them."""
    pins = locked()
    for requirement in runtime_requirements():
        for pinned, _, _ in pins[canonicalize_name(requirement.name)]:
            assert requirement.specifier.contains(pinned, prereleases=True), f"{requirement.name}=={pinned}"


def test_this_run_uses_the_locked_versions() -> None:
    """tools/setup.sh installs from the lock first, so the suite tests what install.sh installs."""
    pins = locked()
    for requirement in runtime_requirements():
        if requirement.marker and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        expected = pin_for_this_python(pins[name])
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            installed = None
        assert installed == expected, f"{name}: installed {installed}, locked {expected} ({sys.version})"
