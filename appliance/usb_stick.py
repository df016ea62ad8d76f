"""What is on a USB stick, read without trusting it: where it is mounted, its files, its DICOMDIR.

Hostile media are expected: DICOMDIR file ids with `..` or absolute parts, symlinks leading off
the stick, FIFOs and device nodes, odd file names. Those are refused with a reason and recorded in
the ImportReport; nothing on the stick is ever written or deleted. File names are shown escaped and
cut to MAX_LOGGED_PATH characters.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import UserError

MAX_LOGGED_PATH = 160
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
log = logging.getLogger(__name__)


@dataclass
class Refusal:
    path: str  # relative to the stick's root, control characters escaped
    reason: str


@dataclass
class ImportReport:
    root: str
    found: int = 0
    imported: int = 0
    duplicates: int = 0
    skipped: list[Refusal] = field(default_factory=list)  # not images, or quarantined by the intake
    refused: list[Refusal] = field(default_factory=list)  # escapes the stick, not a regular file
    missing: list[str] = field(default_factory=list)  # listed in the DICOMDIR but absent

    def counts(self) -> dict[str, int]:
        return {
            "found": self.found,
            "imported": self.imported,
            "duplicates": self.duplicates,
            "skipped": len(self.skipped),
            "refused": len(self.refused),
            "missing": len(self.missing),
        }


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def shown_path(path: Path, root: Path) -> str:
    try:
        text = str(path.relative_to(root))
    except ValueError:
        text = str(path)
    text = repr(text)[1:-1]  # a newline in a file name must not forge a log line
    return text if len(text) <= MAX_LOGGED_PATH else text[: MAX_LOGGED_PATH - 3] + "..."


def count_by_reason(refusals: list[Refusal]) -> dict[str, int]:
    """Counts per reason, without the details (an error text or a quoted file id may hold a name)."""
    counts: dict[str, int] = {}
    for item in refusals:
        reason = _QUOTED.sub("'...'", item.reason.split(" (", 1)[0])
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def _unsafe_file_id(parts: list[str]) -> str | None:
    """Why a DICOMDIR ReferencedFileID is unsafe, or None when it is a plain relative path."""
    if not parts:
        return "empty file id"
    for part in parts:
        if part in ("", ".", ".."):
            return f"file id component {part!r}"
        if "/" in part or "\\" in part or "\0" in part:
            return f"file id component {part!r} holds a separator"
    if len(parts[0]) >= 2 and parts[0][1] == ":":
        return "absolute file id"
    return None


@dataclass
class DicomDirView:
    listed: set[Path] = field(default_factory=set)  # every file a record references (resolved)
    images: set[Path] = field(default_factory=set)  # those referenced by IMAGE records


def read_dicomdir(dicomdir: Path, root: Path, report: ImportReport) -> DicomDirView:
    """Resolve the DICOMDIR's file references, refusing any that would leave the stick."""
    import pydicom

    view = DicomDirView()
    try:
        ds = pydicom.dcmread(dicomdir)
        records = list(ds.get("DirectoryRecordSequence", []))
    except Exception as exc:  # a broken DICOMDIR must not stop the plain walk
        report.skipped.append(Refusal(shown_path(dicomdir, root), f"unreadable DICOMDIR ({exc})"))
        log.warning("USB import: cannot read DICOMDIR %s: %s", dicomdir, exc)
        return view
    base = dicomdir.parent
    for record in records:
        file_id = record.get("ReferencedFileID")
        if file_id is None:
            continue
        parts = (
            [str(p) for p in file_id]
            if isinstance(file_id, list | pydicom.multival.MultiValue)
            else [str(file_id)]
        )
        shown = "\\".join(parts)
        why = _unsafe_file_id(parts)
        target = base.joinpath(*parts) if why is None else base
        if why is None:
            try:
                resolved = target.resolve()
            except (OSError, RuntimeError) as exc:
                why = f"cannot resolve ({exc})"
            else:
                if not _inside(resolved, root):
                    why = "points outside the stick"
        if why is not None:
            report.refused.append(Refusal(f"DICOMDIR:{shown}", why))
            continue
        if not resolved.exists():
            report.missing.append(shown_path(target, root))
            continue
        view.listed.add(resolved)
        if str(record.get("DirectoryRecordType", "")).strip().upper() == "IMAGE":
            view.images.add(resolved)
    return view


def walk_stick(root: Path, report: ImportReport) -> Iterator[Path]:
    """Regular files under root, symlinks only when they stay on the stick; sorted for a stable order."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames.sort()
        for name in list(dirnames):
            entry = here / name
            if entry.is_symlink():
                # Never descend through links (loops, escapes); report those that leave the stick.
                dirnames.remove(name)
                if not _inside(entry.resolve(), root):
                    report.refused.append(
                        Refusal(shown_path(entry, root), "symlink points outside the stick")
                    )
        for name in sorted(filenames):
            entry = here / name
            try:
                st = entry.lstat()
                if stat.S_ISLNK(st.st_mode):
                    target = entry.resolve(strict=True)
                    if not _inside(target, root):
                        report.refused.append(
                            Refusal(shown_path(entry, root), "symlink points outside the stick")
                        )
                        continue
                    st = target.stat()
            except (OSError, RuntimeError) as exc:
                report.refused.append(Refusal(shown_path(entry, root), f"broken or looping symlink ({exc})"))
                continue
            if not stat.S_ISREG(st.st_mode):
                # Reading a FIFO would block; device nodes have no business on a stick.
                report.refused.append(Refusal(shown_path(entry, root), "not a regular file"))
                continue
            yield entry


def survey(root: Path, report: ImportReport) -> tuple[list[Path], DicomDirView]:
    """The stick's files (walk_stick) and what its DICOMDIRs, if any, say about them."""
    files = list(walk_stick(root, report))
    view = DicomDirView()
    for dicomdir in (p for p in files if p.name.upper() == "DICOMDIR"):
        one = read_dicomdir(dicomdir, root, report)
        view.listed |= one.listed
        view.images |= one.images
    return files, view


def _mountpoint_of_device(device: Path) -> Path | None:
    rdev = device.stat().st_rdev
    wanted = f"{os.major(rdev)}:{os.minor(rdev)}"
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[2] == wanted:
                # mountinfo escapes spaces etc. as octal (\040).
                return Path(fields[4].encode().decode("unicode_escape"))
    return None


def resolve_mountpoint(target: Path, wait_s: float = 0.0, poll_s: float = 0.5) -> Path:
    """The folder to import from: `target` itself, or where the block device `target` is mounted.

    With wait_s > 0 wait that long for the mount (systemd-mount --no-block returns before it).
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            mode = target.stat().st_mode
        except FileNotFoundError:
            mode = 0
        if stat.S_ISBLK(mode):
            found = _mountpoint_of_device(target)
            if found is not None:
                return found
        elif stat.S_ISDIR(mode) and (wait_s <= 0 or os.path.ismount(target)):
            return target
        if time.monotonic() >= deadline:
            what = "not mounted" if mode else "does not exist"
            raise UserError(f"USB import: {target} {what}" + (f" after {wait_s:g} s" if wait_s > 0 else ""))
        time.sleep(poll_s)
