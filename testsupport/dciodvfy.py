"""dciodvfy (David Clunie's dicom3tools) as the tests' DICOM validator: every SR and SC they write
must come out without a line starting "Error" (warnings, e.g. about the private coding scheme, pass).

tools/setup.sh --dev installs it (Debian package dicom3tools); where it is missing the check skips,
saying so, rather than passing silently.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

DCIODVFY = shutil.which("dciodvfy")
MISSING = "dciodvfy is not installed (Debian package dicom3tools: tools/setup.sh --dev installs it)"


def dciodvfy(path: Path) -> tuple[int, list[str]]:
    """dciodvfy's exit status and output lines (it reports on stderr) for the file at `path`."""
    assert DCIODVFY is not None, MISSING
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120, check=False)
    return run.returncode, (run.stdout + run.stderr).splitlines()


def errors(path: Path) -> list[str]:
    """dciodvfy's "Error" lines for `path`; its whole output when it failed without naming an error."""
    status, lines = dciodvfy(path)
    found = [line for line in lines if line.startswith("Error")]
    return found or (lines or [f"exit status {status}"] if status != 0 else [])


def assert_valid(paths: Iterable[Path]) -> None:
    """Fail naming each file and its errors; skip (saying why) when dciodvfy is not installed."""
    if DCIODVFY is None:
        pytest.skip(MISSING)
    files = list(paths)
    assert files, "no DICOM files to validate"
    problems = {path.name: found for path in files if (found := errors(path))}
    assert not problems, f"dciodvfy errors: {problems}"
