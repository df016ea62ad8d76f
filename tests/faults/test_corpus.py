"""Third-party DICOM test files through the real `cxr-appliance process`: every kind of object the
libraries' authors thought worth testing (no pixels, RGB, MR, 12-bit lossy JPEG, truncated, DICOMDIR...)
ends in a result with a reason, without a traceback and within a bounded memory.

The files ship inside the installed wheels (pydicom, pynetdicom): nothing is downloaded at test time.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

PEAK_RSS_LIMIT_MB = 700  # the review's bound for any hostile file


def _package_dir(name: str) -> Path | None:
    spec = find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


def installed_test_files() -> list[Path]:
    roots = [
        (_package_dir("pydicom"), "data/test_files"),
        (_package_dir("pynetdicom"), "tests/dicom_files"),
        (_package_dir("highdicom"), "tests"),
    ]
    skip = {".py", ".pyc", ".json", ".gz", ".bz2", ".txt", ".md"}
    found: list[Path] = []
    for package, sub in roots:
        if package is None or not (package / sub).is_dir():
            continue
        found += [p for p in (package / sub).rglob("*") if p.is_file() and p.suffix.lower() not in skip]
    return sorted(found)


def test_every_installed_test_file_gets_a_result_with_a_reason(tmp_path: Path) -> None:
    files = installed_test_files()
    if len(files) < 50:
        pytest.skip(f"only {len(files)} DICOM test files found in the installed packages")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    run = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "process", "--json", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert run.returncode in (0, 1), run.stderr[-3000:]  # 1: some files were not read, as expected
    results = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    assert len(results) == len(files)
    for file, result in zip(files, results, strict=True):
        assert result["status"] in {"ok", "refused", "error"}, file
        if result["status"] != "ok":
            assert result["reason"] and result["text"].startswith("Not read: "), (file, result)
        if result["status"] == "error":  # a file that could not be read is named with the reason
            assert file.name in result["text"], (file, result["text"])
    # The decoders' own tracebacks stay out of the log: a refused file is reported once, in words.
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    if peak_mb > before / 1024:  # ru_maxrss of children is the largest child so far
        assert peak_mb < PEAK_RSS_LIMIT_MB, f"peak {peak_mb:.0f} MB"
    by_name = {f.name: r for f, r in zip(files, results, strict=True)}
    for lossy12 in ("JPEG-lossy.dcm", "JPGExtended.dcm"):
        if lossy12 in by_name:  # 12-bit JPEG Extended: refused up front, with what to do about it
            assert by_name[lossy12]["reason"] == "unsupported transfer syntax"
            assert "12-bit lossy JPEG" in by_name[lossy12]["text"]
