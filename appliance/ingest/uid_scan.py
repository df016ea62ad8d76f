"""A DICOM's SOP Class (File Meta) and SOP Instance UID read with struct, before pydicom is asked.

The intake asks every arriving file for both (the non-image filter, the spool's key); pydicom's parse of
the header for them took ~0.35 ms of a cart image's way to the ward. Only the layout carts and PACS write
is read here: a Part 10 file whose File Meta and dataset are explicit VR little endian, with (0008,0018)
among the first elements and no sequence or undefined length before it. Anything else, and any value
that is not a plain UID of VR UI, answers None: the caller asks pydicom, as before, so both read the same
UIDs. One difference is left: a file repeating (0008,0018) further down, out of order, is read here with
its first value and by pydicom with its last (finding it would mean walking the whole header, sequences
included). Such a file is malformed; its key is still a UID it carries, and a repeat of that UID is told
apart by the dataset hash like any other (appliance/ingest/spool_keys.py).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

_HEAD_BYTES = 16384  # File Meta and group 0008 of any real header; a longer one goes to pydicom
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_ENCAPSULATED = ("1.2.840.10008.1.2.4.", "1.2.840.10008.1.2.5")  # JPEG family, JPEG 2000, RLE
_MEDIA_SOP_CLASS, _TRANSFER_SYNTAX, _SOP_INSTANCE = 0x00020002, 0x00020010, 0x00080018
_VR = re.compile(rb"[A-Z]{2}")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def valid_uid(uid: str) -> bool:
    """PS3.5 9.1: digits and dots, at most 64 characters. Anything else a sender wrote there is no UID
    (and must never become part of a key or a file name as it is)."""
    return 0 < len(uid) <= 64 and _UID.match(uid) is not None


@dataclass(frozen=True)
class ScannedUids:
    sop_class: str | None  # Media Storage SOP Class UID, None when the File Meta has none
    sop_instance: str


def _element(head: bytes, pos: int) -> tuple[int, int, bytes, int] | None:
    """(tag, value position, VR, length) of the element at `pos`; None past the bytes read."""
    if pos + 8 > len(head):
        return None
    group, element = struct.unpack_from("<HH", head, pos)
    vr = head[pos + 4 : pos + 6]
    if _VR.fullmatch(vr) is None:
        return None  # implicit VR where explicit was declared (pydicom guesses; left to it)
    if vr in _LONG_VRS:
        if pos + 12 > len(head):
            return None
        return (group << 16) | element, pos + 12, vr, struct.unpack_from("<I", head, pos + 8)[0]
    return (group << 16) | element, pos + 8, vr, struct.unpack_from("<H", head, pos + 6)[0]


def _uid(value: bytes, *, strip: bool) -> str | None:
    """The value as pydicom gives it (trailing NULs and spaces off, and leading spaces too where
    `strip`, as identity.dicom_uid does), if it is one plain UID."""
    try:
        text = value.decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError:
        return None
    text = text.strip() if strip else text
    return text if valid_uid(text) else None


def scan_uids(path: Path) -> ScannedUids | None:
    """Both UIDs, or None where pydicom must decide (see the module's docstring). OSError propagates."""
    with open(path, "rb") as fh:  # the callers refused links before (identity.plain_file_refusal)
        head = fh.read(_HEAD_BYTES)
    if len(head) < 144 or head[128:132] != b"DICM":
        return None
    values: dict[int, str] = {}
    pos, last = 132, -1
    while (found := _element(head, pos)) is not None:
        tag, at, vr, length = found
        if tag >> 16 != 2 and not _dataset_is_explicit_le(values.get(_TRANSFER_SYNTAX)):
            return None  # a dataset in a syntax read by pydicom only (or no File Meta naming one)
        if tag <= last or length == 0xFFFFFFFF or vr == b"SQ" or at + length > len(head):
            return None  # out of order, a sequence or undefined length: not the layout read here
        if tag in (_MEDIA_SOP_CLASS, _TRANSFER_SYNTAX, _SOP_INSTANCE):
            uid = _uid(head[at : at + length], strip=tag == _SOP_INSTANCE) if vr == b"UI" else None
            if uid is None:
                return None  # another VR (pydicom would convert it differently) or no plain UID
            values[tag] = uid
        if tag >= _SOP_INSTANCE:
            # pydicom keeps the last of repeated tags: answered only when the next one is in order.
            following = _element(head, at + length)
            if tag != _SOP_INSTANCE or following is None or following[0] <= tag:
                return None
            return ScannedUids(values.get(_MEDIA_SOP_CLASS), values[_SOP_INSTANCE])
        last, pos = tag, at + length
    return None


def _dataset_is_explicit_le(syntax: str | None) -> bool:
    return syntax == _EXPLICIT_LE or (syntax is not None and syntax.startswith(_ENCAPSULATED))
