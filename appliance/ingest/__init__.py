"""Ingest: find complete files (watcher), keep them safe (spool), read them (dicom, raster).

`read_image` is the one entry point the later stages use: it looks at the content, not the name.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np

from appliance.errors import InputRejected
from appliance.image import DecodedImage
from appliance.ingest import reasons
from appliance.ingest.dicom import looks_like_dicom, read_dicom
from appliance.ingest.raster import read_raster

__all__ = ["InputRejected", "read_image", "reasons", "sniff"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def sniff(path: Path) -> str:
    """'dicom', 'png' or 'jpeg' from the first bytes; InputRejected for anything else."""
    name = path.name
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise InputRejected(reasons.NOT_A_FILE, f"{name}: {kind}")
        if st.st_size == 0:
            raise InputRejected(reasons.EMPTY_FILE, f"{name}: 0 bytes")
        with open(path, "rb") as fh:
            head = fh.read(132)
    except PermissionError as exc:
        raise InputRejected(reasons.PERMISSION_DENIED, f"{name}: {exc.strerror}") from exc
    except FileNotFoundError as exc:
        raise InputRejected(reasons.VANISHED, f"{name}: no longer there") from exc
    except OSError as exc:  # ELOOP from a symlink loop, EIO from a pulled USB stick, ...
        if exc.errno == errno.ELOOP:
            raise InputRejected(reasons.SYMLINK_LOOP, f"{name}: {exc.strerror}") from exc
        raise InputRejected(reasons.NOT_A_FILE, f"{name}: {exc.strerror or exc}") from exc
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if looks_like_dicom(head):
        return "dicom"
    raise InputRejected(reasons.UNKNOWN_FORMAT, f"{name}: content is neither DICOM, PNG nor JPEG")


def read_image(path: Path, *, max_pixels: int = 60_000_000, target_size: int | None = None) -> DecodedImage:
    """Decode one file into float32 [0, 1] pixels and its metadata, or raise InputRejected.

    `target_size`: the longest side the model needs; decoders able to decode at reduced resolution
    (JPEG DCT scaling, JPEG 2000 resolution levels) may then return fewer pixels (DecodedImage.scale > 1).
    """
    path = Path(path)
    kind = sniff(path)
    if kind == "dicom":
        image = read_dicom(path, max_pixels=max_pixels, target_size=target_size)
    else:
        image = read_raster(path, kind, max_pixels=max_pixels, target_size=target_size)
    # A NaN/inf slope, window or float pixel would reach the model and every later stage unnoticed.
    if not np.isfinite(image.pixels).all():
        raise InputRejected(
            reasons.INVALID_IMAGE if kind != "dicom" else reasons.INVALID_DICOM,
            f"{path.name}: non-finite pixel values after rescale/window (NaN or infinity in the tags or data)",
        )
    return image
