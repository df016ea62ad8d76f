"""DICOM via pydicom 3 with a permissive decoder stack (Pillow, pylibjpeg-openjpeg, python-gdcm).

Order of work: parse the header with large values deferred, refuse what we cannot or must not decode
(size, transfer syntax, photometric, truncation) BEFORE touching pixels, then decode the first frame
only and map it to float32 [0, 1] with the Modality LUT, VOI LUT/window and MONOCHROME1 inversion.
The checks live in dicom_checks.py, the decoding in dicom_pixels.py, the tags in dicom_meta.py.
"""

from __future__ import annotations

import logging
import struct
import threading
import warnings
import zlib
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLossless,
    JPEGLosslessSV1,
)

from appliance.errors import InputRejected
from appliance.image import DecodedImage
from appliance.ingest import reasons
from appliance.ingest.bounded import BoundedFile
from appliance.ingest.dicom_checks import frame_count, refuse_before_decoding, size_checkable, stored_length
from appliance.ingest.dicom_meta import image_meta
from appliance.ingest.dicom_pixels import (
    acc_type,
    decode_full_frame,
    decode_jpeg_lossless,
    decode_reduced,
    pool_factor,
    pool_rows,
    poolable,
    stream_block_mean,
)
from appliance.ingest.dicom_values import to_unit

# Values above this many bytes stay on disk while the header is parsed, so a huge native image is
# refused without ever being read into memory.
_DEFER_BYTES = 64 * 1024
# A deflated dataset is inflated whole by pydicom; past this many bytes it is refused first (the watcher's
# completeness check and the spool's de-duplication read headers with no pixel limit at hand).
MAX_INFLATED_BYTES = 256 << 20
_GDCM_DIRECT = (JPEGLossless, JPEGLosslessSV1)
_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# A frame decoded at full size (JPEG lossless, anything without a reduced route) holds ~40 MB while it is
# decoded and pooled. The daemon reads on two threads (appliance/feeder.py): two such frames at once took
# its peak memory past its 300 MB budget, so they are decoded one at a time (the small ones beside them).
_FULL_FRAME = threading.Lock()


class _PydicomWarnings(logging.Filter):
    """pydicom logs every warning it raises (pydicom.misc.warn_and_log). A thread parsing a file collects
    its own here: `warnings.catch_warnings` would swap process-wide state while the other reading thread
    (appliance/feeder.py) parses too, and one thread's warnings would land in the other's list. The
    truncation line is dropped: the watcher polls half-written files, it would repeat every second."""

    collecting = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith("Invalid value for VR"):
            # "Invalid value for VR DA: '1950-01-01'": the value may be the patient's (a birth date, a
            # name), and the log is read by engineers who need the kind of fault, not the data.
            text = f"{text.partition(':')[0]} (the value is not logged: it may be the patient's)"
            record.msg, record.args = text, ()
        mine: list[str] | None = getattr(self.collecting, "messages", None)
        if mine is not None and record.funcName == "warn_and_log":
            mine.append(text)
        return "End of file reached" not in text


_PYDICOM_WARNINGS = _PydicomWarnings()
logging.getLogger("pydicom").addFilter(_PYDICOM_WARNINGS)
# The same warnings again on stderr add nothing: warn_and_log has logged each one already, and a
# hostile file can make hundreds of distinct ones.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")


def looks_like_dicom(head: bytes) -> bool:
    """Part 10 file (preamble + DICM), or a bare dataset starting with a group 0002/0008 element."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    element = int.from_bytes(head[2:4], "little")
    # Bare datasets start with File Meta (0002) or Identifying (0008) group; element numbers are small.
    return group in (0x0002, 0x0008) and element < 0x0200


def read_dicom(path: Path, *, max_pixels: int, target_size: int | None = None) -> DecodedImage:
    name = path.name
    ds = _parse(path, max_inflated=_max_inflated(max_pixels))
    meta = image_meta(ds)
    refuse_before_decoding(ds, path, meta, max_pixels)
    ts = meta.transfer_syntax or ""
    factor = pool_factor(ds, target_size)
    # Uncompressed: block means straight from the file, a few rows at a time (no full-size copy).
    pooled = stream_block_mean(path, ds, factor) if factor and ts in _NATIVE else None
    if pooled is None:
        reduced = decode_reduced(path, ds, ts, target_size)
        if reduced is not None:
            return DecodedImage(pixels=to_unit(reduced[0], ds, name), meta=meta, scale=reduced[1])
        with _FULL_FRAME:
            direct = decode_jpeg_lossless(path, ds) if ts in _GDCM_DIRECT else None
            raw = direct if direct is not None else decode_full_frame(ds, name, ts)
            if not (factor and poolable(raw)):
                return DecodedImage(pixels=to_unit(raw, ds, name), meta=meta, scale=1.0)
            pooled = pool_rows([raw], factor, raw.shape[1] // factor, acc_type(raw.dtype))
            del raw, direct  # the full-size frame goes before the lock is released
    means, extremes = pooled
    pixels = to_unit(means, ds, name, extremes=extremes)
    return DecodedImage(pixels=pixels, meta=meta, scale=float(factor))


def check_dicom(path: Path, *, max_pixels: int) -> None:
    """InputRejected for whatever read_dicom refuses before decoding; nothing is decoded.

    For a sender waiting on an answer (the C-STORE receiver): told now, not after a "Success"."""
    ds = _parse(path, max_inflated=_max_inflated(max_pixels))
    refuse_before_decoding(ds, path, image_meta(ds), max_pixels)


def _max_inflated(max_pixels: int) -> int:
    return min(MAX_INFLATED_BYTES, max_pixels * 2 + (16 << 20))


def incomplete_reason(path: Path) -> str | None:
    """None when the DICOM parses to its end with all declared pixel bytes present, else why not.

    Cheap (pixel data stays on disk): the watcher calls it on files that may still be being written."""
    try:
        ds = _parse(path)
    except InputRejected as exc:
        return None if exc.reason not in (reasons.TRUNCATED_DICOM, reasons.INVALID_DICOM) else exc.detail
    if "PixelData" not in ds or not size_checkable(UID(str(ds.file_meta.get("TransferSyntaxUID", "")))):
        return None  # encapsulated data without its delimiter was already caught by _parse
    try:
        rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    expected = rows * cols * frame_count(ds) * samples * bits // 8
    have = stored_length(ds.get_item("PixelData", keep_deferred=True), path)
    return (
        None if have >= expected else f"{path.name}: Pixel Data holds {have:,} bytes, {expected:,} declared"
    )


def _parse(path: Path, max_inflated: int = MAX_INFLATED_BYTES) -> Dataset:
    """The dataset with large values deferred; a deflated dataset inflating beyond `max_inflated` bytes
    is refused before pydicom inflates it whole."""
    name = path.name
    caught: list[str] = []
    _PYDICOM_WARNINGS.collecting.messages = caught
    try:
        refuse_deflate_bomb(path, max_inflated)
        # force=True only matters for bare datasets without preamble (looks_like_dicom checked them).
        with BoundedFile(path) as fh:
            ds = pydicom.dcmread(fh, defer_size=_DEFER_BYTES, force=True)
        ds.fileobj_type = BoundedFile  # pydicom would re-open deferred values with plain open()
        for tag in list(ds.keys()):
            # Convert every top-level value now, so a bad VR or value fails here and is named;
            # deferred values (value None) stay on disk.
            if ds.get_item(tag, keep_deferred=True).value is not None:
                ds[tag]
    except PermissionError as exc:
        raise InputRejected(reasons.PERMISSION_DENIED, f"{name}: {exc.strerror}") from exc
    except FileNotFoundError as exc:
        raise InputRejected(reasons.VANISHED, f"{name}: disappeared while reading") from exc
    except EOFError as exc:
        raise InputRejected(reasons.TRUNCATED_DICOM, f"{name}: file ends inside the header ({exc})") from exc
    except (
        InvalidDicomError,
        BytesLengthException,
        ValueError,
        KeyError,
        TypeError,
        OverflowError,
        NotImplementedError,
        struct.error,
        zlib.error,
        OSError,  # pydicom: "No tag to read at file position ..." for a sequence item cut short
    ) as exc:
        raise InputRejected(reasons.INVALID_DICOM, f"{name}: {type(exc).__name__}: {exc}") from exc
    finally:
        _PYDICOM_WARNINGS.collecting.messages = None
    for text in caught:
        # pydicom warns (not raises) when encapsulated data ends before its sequence delimiter.
        if "End of file reached" in text or "delimiter" in text.lower():
            raise InputRejected(reasons.TRUNCATED_DICOM, f"{name}: {text}")
    if "TransferSyntaxUID" not in ds.file_meta:
        # A bare dataset: pydicom guessed the encoding; name it so it can be checked like any other.
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if ds.original_encoding[0]
            else pydicom.uid.ExplicitVRLittleEndian
        )
    if len(ds) == 0:
        raise InputRejected(reasons.INVALID_DICOM, f"{name}: no data elements could be parsed")
    return ds


def refuse_deflate_bomb(path: Path, limit: int = MAX_INFLATED_BYTES) -> None:
    """Inflate a Deflated Explicit VR dataset in bounded steps, counting bytes, before pydicom inflates it."""
    # The File Meta is read by hand: pydicom's reader would take a corrupt length at its word and
    # allocate it (a 1 GB read for a 128 kB file).
    with BoundedFile(path) as fh:
        head = fh.read(4096)
        if len(head) < 144 or head[128:132] != b"DICM":
            return
        if DeflatedExplicitVRLittleEndian.encode() not in head[132:]:
            return  # the File Meta names another syntax (or none: dcmread decides)
        fh.seek(144 + struct.unpack_from("<I", head, 140)[0])  # (0002,0000) gives the meta length
        inflater, total, pending = zlib.decompressobj(-zlib.MAX_WBITS), 0, b""
        while not inflater.eof:
            pending = pending or fh.read(1 << 16)
            if not pending:
                return
            try:  # 4 MB of output at a time, counted and dropped: the check itself stays small
                total += len(inflater.decompress(pending, 1 << 22))
            except zlib.error:
                return  # not a valid deflate stream: dcmread says so
            pending = inflater.unconsumed_tail
            if total > limit:
                raise InputRejected(
                    reasons.IMAGE_TOO_LARGE,
                    f"{path.name}: deflated dataset inflates beyond {limit:,} bytes (a decompression bomb?)",
                )
