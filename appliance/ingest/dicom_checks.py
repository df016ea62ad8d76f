"""What a DICOM must pass before any pixel is decoded: pixel data present and sane tags, the
transfer syntax decodable here, a grey radiograph, all declared bytes present, and compressed
codestream headers that agree with the tags and the pixel limit."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from appliance.errors import InputRejected
from appliance.image import ImageMeta
from appliance.ingest import headers, reasons
from appliance.ingest.bounded import BoundedFile
from appliance.ingest.encapsulated import ITEM_TAG, seek_first_fragment

_GREY = ("MONOCHROME1", "MONOCHROME2")
# Encapsulated syntaxes whose first frame's header is checked against the tags before decoding.
_JPEG_FAMILY = (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes)
_J2K_FAMILY = tuple(JPEG2000TransferSyntaxes)
# Lossy JPEG frames (baseline, extended, progressive; Huffman and arithmetic); SOF3/7/11/15 are lossless.
_LOSSY_JPEG_FRAMES = {"SOF0", "SOF1", "SOF2", "SOF5", "SOF6", "SOF9", "SOF10", "SOF13", "SOF14"}
_HEADER_BYTES = 1 << 20  # SOF/SIZ lie within the first kB; APPn segments of 64 kB each may come first


def int_tag(ds: Dataset, key: str, default: int = 0) -> int:
    """An integer tag as written, or `default` when it is missing, empty, multi-valued or not a number."""
    value = ds.get(key)
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0] if len(value) == 1 else None
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError, OverflowError):
        return default


def refuse_before_decoding(ds: Dataset, path: Path, meta: ImageMeta, max_pixels: int) -> None:
    name = path.name
    if "PixelData" not in ds:
        others = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        what = f" (only {others[0]}, not supported)" if others else ""
        raise InputRejected(reasons.NO_PIXEL_DATA, f"{name}: the DICOM holds no Pixel Data{what}")
    rows, cols = int_tag(ds, "Rows"), int_tag(ds, "Columns")
    frames = frame_count(ds)
    if rows <= 0 or cols <= 0:
        raise InputRejected(reasons.INVALID_DICOM, f"{name}: Rows/Columns missing or zero ({rows} x {cols})")
    if rows * cols * frames > max_pixels:
        extra = f" x {frames} frames" if frames > 1 else ""
        raise InputRejected(
            reasons.IMAGE_TOO_LARGE,
            f"{name}: {rows} x {cols}{extra} declared ({rows * cols * frames:,} pixels > limit {max_pixels:,})",
        )
    ts = UID(meta.transfer_syntax or "")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise InputRejected(reasons.UNSUPPORTED_TRANSFER_SYNTAX, f"{name}: {ts.name or ts} ({ts})") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise InputRejected(
            reasons.UNSUPPORTED_TRANSFER_SYNTAX, f"{name}: {ts.name} ({ts}): no decoder installed ({missing})"
        )
    photometric = meta.photometric or ""
    samples = int_tag(ds, "SamplesPerPixel", 1)
    if photometric not in _GREY or samples != 1:
        raise InputRejected(
            reasons.UNSUPPORTED_PHOTOMETRIC,
            f"{name}: {photometric or 'missing'} with {samples} sample(s) per pixel; a grey radiograph is needed",
        )
    bits_alloc, bits_stored = int_tag(ds, "BitsAllocated"), int_tag(ds, "BitsStored")
    if bits_alloc not in (8, 16) or not 1 <= bits_stored <= bits_alloc:
        raise InputRejected(
            reasons.UNSUPPORTED_PIXEL_FORMAT,
            f"{name}: Bits Allocated {bits_alloc}, Bits Stored {bits_stored}",
        )
    if size_checkable(ts):
        # Native data: the declared size must be in the file; a short value means the copy is incomplete.
        elem: Any = ds.get_item("PixelData", keep_deferred=True)
        expected = rows * cols * frames * bits_alloc // 8
        have = stored_length(elem, path)
        if have < expected:
            raise InputRejected(
                reasons.TRUNCATED_DICOM, f"{name}: Pixel Data holds {have:,} bytes, {expected:,} declared"
            )
    elif ts.is_encapsulated and not _encapsulated(ds.get_item("PixelData", keep_deferred=True), path):
        # A native image relabelled as compressed: GDCM aborts the whole process (a C++ exception
        # through SWIG) on such data, so it must never get that far.
        raise InputRejected(
            reasons.INVALID_DICOM, f"{name}: Pixel Data is not encapsulated, although {ts.name or ts} says so"
        )
    elif ts in _JPEG_FAMILY or ts in _J2K_FAMILY:
        _refuse_codestream(ds, path, ts, (rows, cols, samples), max_pixels)


def _refuse_codestream(ds: Dataset, path: Path, ts: UID, tags: tuple[int, int, int], max_pixels: int) -> None:
    """The first frame's SOF/SIZ must declare what Rows, Columns and Samples per Pixel say: the
    decoders size their buffers by the codestream, so the limit checked on the tags must hold for it."""
    name = path.name
    head = _first_fragment(ds, path)
    kind = "JPEG 2000" if ts in _J2K_FAMILY else "JPEG-LS" if ts in JPEGLSTransferSyntaxes else "JPEG"
    declared = headers.j2k_frames(head) if ts in _J2K_FAMILY else headers.jpeg_frames(head)
    if not declared:
        raise InputRejected(
            reasons.INVALID_DICOM, f"{name}: no {kind} header found at the start of the first frame"
        )
    for d in declared:
        if d.pixels > max_pixels:
            raise InputRejected(
                reasons.IMAGE_TOO_LARGE,
                f"{name}: {d.height} x {d.width} declared by the {kind} {d.header}"
                f" ({d.pixels:,} pixels > limit {max_pixels:,})",
            )
    for d in declared:
        if d.header in _LOSSY_JPEG_FRAMES and d.precision > 8:
            # Neither Pillow nor the GDCM wheel decodes 12-bit lossy JPEG (GDCM's build lacks the 12-bit
            # IJG codec); the only Python decoder that does is GPL. Refused up front, in plain words.
            raise InputRejected(
                reasons.UNSUPPORTED_TRANSFER_SYNTAX,
                f"{name}: {d.precision}-bit lossy JPEG ({d.header}, JPEG Extended) cannot be decoded here;"
                " set the X-ray unit to send uncompressed, JPEG Lossless or JPEG 2000",
            )
    rows, cols, samples = tags
    for d in declared:
        if (d.height, d.width, d.components) != (rows, cols, samples):
            raise InputRejected(
                reasons.HEADER_MISMATCH,
                f"{name}: the {kind} {d.header} declares {d.height} x {d.width} x {d.components} component(s),"
                f" Rows/Columns/Samples per Pixel say {rows} x {cols} x {samples}",
            )


def _first_fragment(ds: Dataset, path: Path) -> bytes:
    """Up to _HEADER_BYTES of the first fragment of encapsulated Pixel Data (where the first frame's
    header is), read straight from the file when the value is deferred: never the whole value."""
    elem: Any = ds.get_item("PixelData", keep_deferred=True)
    value = getattr(elem, "value", None)
    with io.BytesIO(value) if value is not None else BoundedFile(path) as fh:
        if value is None:
            fh.seek(int(elem.value_tell))
        length = seek_first_fragment(fh)
        return b"" if length is None else fh.read(min(length, _HEADER_BYTES))


def _encapsulated(elem: Any, path: Path) -> bool:
    """Undefined length and a first item tag (FFFE,E000), read from the file if the value is deferred."""
    undefined = (
        elem.is_undefined_length if hasattr(elem, "is_undefined_length") else elem.length == 0xFFFFFFFF
    )
    if not undefined:
        return False
    value = getattr(elem, "value", None)
    if value is None:
        with open(path, "rb") as fh:
            fh.seek(int(elem.value_tell))
            value = fh.read(4)
    return bytes(value[:4]) == ITEM_TAG


def size_checkable(ts: UID) -> bool:
    """Native data in the file as is: its declared size can be compared with the file's. Not so for
    encapsulated fragments, nor for a deflated dataset (offsets point into the inflated copy), nor for a
    UID that is no transfer syntax pydicom knows (it raises ValueError; the reader refuses the file)."""
    try:
        return not ts.is_encapsulated and ts != DeflatedExplicitVRLittleEndian
    except ValueError:
        return False


def stored_length(elem: Any, path: Path) -> int:
    """Bytes of a (possibly still deferred) Pixel Data value that really are in the file."""
    value = getattr(elem, "value", None)
    if value is not None:
        return len(value)
    tell, length = int(getattr(elem, "value_tell", 0) or 0), int(getattr(elem, "length", 0) or 0)
    return max(0, min(length, os.path.getsize(path) - tell))


def frame_count(ds: Dataset) -> int:
    return max(1, int_tag(ds, "NumberOfFrames", 1))
