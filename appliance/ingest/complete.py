"""Is a file finished? Format-aware checks for files that may still be being written."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.ingest.dicom import incomplete_reason as dicom_incomplete_reason
from appliance.ingest.dicom import looks_like_dicom

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"


def incomplete_reason(path: Path) -> str | None:
    """None when the file looks whole (or is not an image at all: the reader will refuse it later),
    else a short text saying what is still missing. PermissionError/OSError propagate."""
    size = os.path.getsize(path)
    if size == 0:
        return None
    with open(path, "rb") as fh:
        head = fh.read(132)
        fh.seek(max(0, size - 64))
        tail = fh.read()
    if head.startswith(_PNG_MAGIC):
        return None if _PNG_END in tail else f"{path.name}: PNG without its IEND chunk"
    if head.startswith(b"\xff\xd8\xff"):
        # Writers sometimes pad after the End Of Image marker.
        return None if tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9") else f"{path.name}: JPEG without EOI"
    if len(head) < 132 and not head.strip(b"\x00"):
        return f"{path.name}: only {size} zero bytes so far (a DICOM preamble?)"
    if looks_like_dicom(head):
        return dicom_incomplete_reason(path)
    return None
