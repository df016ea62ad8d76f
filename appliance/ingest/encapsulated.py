"""Encapsulated Pixel Data read straight from the file: an item tag (FFFE,E000) and a 32-bit length per
item, the Basic Offset Table first, then the fragments, then the sequence delimiter (FFFE,E0DD)."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset

from appliance.ingest.bounded import BoundedFile

ITEM_TAG = b"\xfe\xff\x00\xe0"  # little endian, as every encapsulated transfer syntax is
SEQUENCE_END = b"\xfe\xff\xdd\xe0"


def seek_first_fragment(fh: BinaryIO) -> int | None:
    """From the start of an encapsulated Pixel Data value: past the offset table item to the first
    fragment's bytes; returns that fragment's length, None when the items are not there."""
    length = 0
    for item in ("offset table", "first fragment"):
        head = fh.read(8)
        if len(head) < 8 or head[:4] != ITEM_TAG:
            return None
        (length,) = struct.unpack_from("<I", head, 4)
        if item == "offset table":
            fh.seek(length, io.SEEK_CUR)
    return length


def first_frame(path: Path, ds: Dataset, frames: int) -> bytes:
    """The first frame's codestream. The one fragment of a single-frame image whose Pixel Data is still
    on disk is read straight from the file, in one read: pydicom would scan the whole value in Python
    and then copy the frame out of it, holding the GIL (a 7.5 MB lossless cart image: ~6.5 ms, ~1 ms
    this way). Anything else (several fragments or frames, a value in memory): pydicom reads it."""
    fragment = _lone_fragment(path, ds) if frames == 1 else None
    if fragment is not None:
        return fragment
    return pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=frames)


def _lone_fragment(path: Path, ds: Dataset) -> bytes | None:
    elem: Any = ds.get_item("PixelData", keep_deferred=True)
    offset = getattr(elem, "value_tell", None)
    if getattr(elem, "value", None) is not None or offset is None:
        return None
    try:
        with BoundedFile(path) as fh:  # a corrupt length reads at most to the end of the file
            fh.seek(int(offset))
            length = seek_first_fragment(fh)
            if length is None:
                return None
            fragment = fh.read(length)
            if len(fragment) != length or fh.read(8)[:4] != SEQUENCE_END:
                return None  # cut short, or more fragments follow
    except OSError:
        return None
    return fragment
