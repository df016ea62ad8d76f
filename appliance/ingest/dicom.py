"""DICOM via pydicom 3 with a permissive decoder stack (Pillow, pylibjpeg-openjpeg, python-gdcm).

Order of work: parse the header with large values deferred, refuse what we cannot or must not decode
(size, transfer syntax, photometric, truncation) BEFORE touching pixels, then decode the first frame
only and map it to float32 [0, 1] with the Modality LUT, VOI LUT/window and MONOCHROME1 inversion.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from appliance.errors import InputRejected

try:  # optional: the JPEG lossless fast path (the pydicom plugins remain the fallback)
    import gdcm
except ImportError:  # pragma: no cover - python-gdcm is a dependency, but a missing one is survivable
    gdcm = None
from appliance.image import DecodedImage, ImageMeta
from appliance.ingest import headers, reasons
from appliance.ingest.bounded import BoundedFile

# Values above this many bytes stay on disk while the header is parsed, so a huge native image is
# refused without ever being read into memory.
_DEFER_BYTES = 64 * 1024
# A deflated dataset is inflated whole by pydicom; past this many bytes it is refused first (the watcher's
# completeness check and the spool's de-duplication read headers with no pixel limit at hand).
MAX_INFLATED_BYTES = 256 << 20
_GREY = ("MONOCHROME1", "MONOCHROME2")
_J2K = (JPEG2000, JPEG2000Lossless)
# Encapsulated syntaxes whose first frame's header is checked against the tags before decoding.
_JPEG_FAMILY = (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes)
_J2K_FAMILY = tuple(JPEG2000TransferSyntaxes)
# Lossy JPEG frames (baseline, extended, progressive; Huffman and arithmetic); SOF3/7/11/15 are lossless.
_LOSSY_JPEG_FRAMES = {"SOF0", "SOF1", "SOF2", "SOF5", "SOF6", "SOF9", "SOF10", "SOF13", "SOF14"}
# Acquisition dates before ACR-NEMA (1985) are placeholders: 19000101 or 19010101 from anonymisers,
# 19700101 from a clock never set. So are dates past next year (99991231).
_FIRST_PLAUSIBLE_YEAR = 1985
_HEADER_BYTES = 1 << 20  # SOF/SIZ lie within the first kB; APPn segments of 64 kB each may come first
_GDCM_DIRECT = (JPEGLossless, JPEGLosslessSV1)
_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_STREAM_BLOCK_ROWS = 16  # block rows per read: ~0.7 MB of a 2.5k-wide 16-bit image
# Which installed plugin decodes which syntax first (all permissively licensed); pydicom's automatic
# choice is the fallback. pylibjpeg's JPEG plugin needs the GPL libjpeg and is never named here.
_PREFERRED_PLUGIN: dict[str, str] = {
    JPEGBaseline8Bit: "pillow",
    JPEGExtended12Bit: "gdcm",
    JPEGLossless: "gdcm",
    JPEGLosslessSV1: "gdcm",
    JPEGLSLossless: "gdcm",
    JPEGLSNearLossless: "gdcm",
    JPEG2000: "pylibjpeg",
    JPEG2000Lossless: "pylibjpeg",
    HTJ2K: "pylibjpeg",
    HTJ2KLossless: "pylibjpeg",
    HTJ2KLosslessRPCL: "pylibjpeg",
}


class _DropTruncationNoise(logging.Filter):
    """pydicom logs *and* warns about a missing delimiter; we turn the warning into InputRejected, and
    the watcher polls half-written files, so the log line would repeat every second."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "End of file reached" not in record.getMessage()


logging.getLogger("pydicom").addFilter(_DropTruncationNoise())


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
    meta = _meta(ds)
    _refuse_before_decoding(ds, path, meta, max_pixels)
    ts = meta.transfer_syntax or ""
    factor = _pool_factor(ds, target_size)
    # Uncompressed: block means straight from the file, a few rows at a time (no full-size copy).
    pooled = _stream_block_mean(path, ds, factor) if factor and ts in _NATIVE else None
    if pooled is None:
        direct = _decode_jpeg_lossless(path, ds) if ts in _GDCM_DIRECT else None
        raw, scale = (direct, 1.0) if direct is not None else _decode_first_frame(ds, name, ts, target_size)
        if not (factor and scale == 1.0 and _poolable(raw)):
            return DecodedImage(pixels=_to_unit(raw, ds, name), meta=meta, scale=scale)
        pooled = _pool_rows([raw], factor, raw.shape[1] // factor, _acc_type(raw.dtype))
    means, extremes = pooled
    pixels = _to_unit(means, ds, name, extremes=extremes)
    return DecodedImage(pixels=pixels, meta=meta, scale=float(factor))


def check_dicom(path: Path, *, max_pixels: int) -> None:
    """InputRejected for whatever read_dicom refuses before decoding; nothing is decoded.

    For a sender waiting on an answer (the C-STORE receiver): told now, not after a "Success"."""
    ds = _parse(path, max_inflated=_max_inflated(max_pixels))
    _refuse_before_decoding(ds, path, _meta(ds), max_pixels)


def _max_inflated(max_pixels: int) -> int:
    return min(MAX_INFLATED_BYTES, max_pixels * 2 + (16 << 20))


def incomplete_reason(path: Path) -> str | None:
    """None when the DICOM parses to its end with all declared pixel bytes present, else why not.

    Cheap (pixel data stays on disk): the watcher calls it on files that may still be being written."""
    try:
        ds = _parse(path)
    except InputRejected as exc:
        return None if exc.reason not in (reasons.TRUNCATED_DICOM, reasons.INVALID_DICOM) else exc.detail
    if "PixelData" not in ds or not _size_checkable(UID(str(ds.file_meta.get("TransferSyntaxUID", "")))):
        return None  # encapsulated data without its delimiter was already caught by _parse
    try:
        rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    expected = rows * cols * _frames(ds) * samples * bits // 8
    have = _stored_length(ds.get_item("PixelData", keep_deferred=True), path)
    return (
        None if have >= expected else f"{path.name}: Pixel Data holds {have:,} bytes, {expected:,} declared"
    )


def _parse(path: Path, max_inflated: int = MAX_INFLATED_BYTES) -> Dataset:
    """The dataset with large values deferred; a deflated dataset inflating beyond `max_inflated` bytes
    is refused before pydicom inflates it whole."""
    name = path.name
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
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
    for w in caught:
        text = str(w.message)
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


def _int(ds: Dataset, key: str, default: int = 0) -> int:
    """An integer tag as written, or `default` when it is missing, empty, multi-valued or not a number."""
    value = ds.get(key)
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0] if len(value) == 1 else None
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError, OverflowError):
        return default


def _refuse_before_decoding(ds: Dataset, path: Path, meta: ImageMeta, max_pixels: int) -> None:
    name = path.name
    if "PixelData" not in ds:
        others = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        what = f" (only {others[0]}, not supported)" if others else ""
        raise InputRejected(reasons.NO_PIXEL_DATA, f"{name}: the DICOM holds no Pixel Data{what}")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    frames = _frames(ds)
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
    samples = _int(ds, "SamplesPerPixel", 1)
    if photometric not in _GREY or samples != 1:
        raise InputRejected(
            reasons.UNSUPPORTED_PHOTOMETRIC,
            f"{name}: {photometric or 'missing'} with {samples} sample(s) per pixel; a grey radiograph is needed",
        )
    bits_alloc, bits_stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
    if bits_alloc not in (8, 16) or not 1 <= bits_stored <= bits_alloc:
        raise InputRejected(
            reasons.UNSUPPORTED_PIXEL_FORMAT,
            f"{name}: Bits Allocated {bits_alloc}, Bits Stored {bits_stored}",
        )
    if _size_checkable(ts):
        # Native data: the declared size must be in the file; a short value means the copy is incomplete.
        elem: Any = ds.get_item("PixelData", keep_deferred=True)
        expected = rows * cols * frames * bits_alloc // 8
        have = _stored_length(elem, path)
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
        length = 0
        for item in ("offset table", "first fragment"):
            head = fh.read(8)
            if len(head) < 8 or head[:4] != b"\xfe\xff\x00\xe0":
                return b""
            (length,) = struct.unpack_from("<I", head, 4)
            if item == "offset table":
                fh.seek(length, io.SEEK_CUR)
        return fh.read(min(length, _HEADER_BYTES))


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
    return bytes(value[:4]) == b"\xfe\xff\x00\xe0"


def _size_checkable(ts: UID) -> bool:
    """Native data in the file as is: its declared size can be compared with the file's. Not so for
    encapsulated fragments, nor for a deflated dataset (offsets point into the inflated copy)."""
    return not ts.is_encapsulated and ts != DeflatedExplicitVRLittleEndian


def _stored_length(elem: Any, path: Path) -> int:
    """Bytes of a (possibly still deferred) Pixel Data value that really are in the file."""
    value = getattr(elem, "value", None)
    if value is not None:
        return len(value)
    tell, length = int(getattr(elem, "value_tell", 0) or 0), int(getattr(elem, "length", 0) or 0)
    return max(0, min(length, os.path.getsize(path) - tell))


def _frames(ds: Dataset) -> int:
    return max(1, _int(ds, "NumberOfFrames", 1))


def _decode_first_frame(ds: Dataset, name: str, ts: str, target_size: int | None) -> tuple[np.ndarray, float]:
    if target_size and ds.get("PixelRepresentation", 0) == 0 and (ts == JPEGBaseline8Bit or ts in _J2K):
        reduced = _decode_reduced(ds, ts, target_size)
        if reduced is not None:
            return reduced
    plugin = _PREFERRED_PLUGIN.get(ts, "")
    if plugin and plugin not in get_decoder(UID(ts)).available_plugins:
        plugin = ""
    try:
        try:
            arr = pydicom.pixels.pixel_array(ds, index=0, decoding_plugin=plugin)
        except Exception:
            if not plugin:
                raise
            arr = pydicom.pixels.pixel_array(ds, index=0)  # any other installed plugin
    except MemoryError:
        raise
    except Exception as exc:
        raise InputRejected(reasons.DECODE_FAILED, f"{name}: {type(exc).__name__}: {exc}") from exc
    return arr, 1.0


def _decode_jpeg_lossless(path: Path, ds: Dataset) -> np.ndarray | None:
    """First frame straight into a numpy array with GDCM's region reader (about 3x faster than the
    pydicom plugin, which takes the pixels through a Python str and back); None -> the usual path."""
    if gdcm is None or ds.get("PixelRepresentation", 0) != 0 or ds.get("BitsAllocated") not in (8, 16):
        return None
    try:
        reader = gdcm.ImageRegionReader()
        reader.SetFileName(os.fspath(path))
        if not reader.ReadInformation():
            return None
        image = reader.GetImage()
        cols, rows = image.GetDimension(0), image.GetDimension(1)
        samples = image.GetPixelFormat().GetSamplesPerPixel()
        if (rows, cols) != (int(ds.Rows), int(ds.Columns)) or samples != 1:
            return None
        box = gdcm.BoxRegion()
        box.SetDomain(0, cols - 1, 0, rows - 1, 0, 0)  # the first frame
        reader.SetRegion(box)
        out = np.empty((rows, cols), dtype=np.uint16 if ds.BitsAllocated == 16 else np.uint8)
        if reader.ComputeBufferLength() != out.nbytes or not reader.ReadIntoBuffer(out):
            return None
    except Exception:
        return None
    return out


def _decode_reduced(ds: Dataset, ts: str, target_size: int) -> tuple[np.ndarray, float] | None:
    """Decode at 1/2^k size with Pillow (libjpeg DCT scaling, OpenJPEG resolution levels).

    Returns None whenever anything is unusual, so the full-size path decides."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    levels = math.floor(math.log2(min(rows, cols) / target_size)) if min(rows, cols) > target_size else 0
    if levels <= 0:
        return None
    try:
        frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=_frames(ds))
    except Exception:
        return None
    # Pillow rounds a reduced JPEG 2000 size to nearest, OpenJPEG up: where they differ (2467 px by 8:
    # 308 vs 309) the decode fails ("broken data stream"). Take the deepest level where they agree,
    # and still fall back one level at a time should OpenJPEG refuse for another reason.
    wanted: tuple[int, ...] = (levels,)
    if ts in _J2K:
        wanted = tuple(
            n for n in range(min(levels, 5), 0, -1) if _same_rounding(rows, n) and _same_rounding(cols, n)
        )
    for level in wanted:
        try:
            img = Image.open(io.BytesIO(frame))
            if ts == JPEGBaseline8Bit:
                img.draft("L", (cols >> level, rows >> level))
            else:
                img.reduce = level  # type: ignore[assignment,method-assign]
            img.load()
            if img.mode not in ("L", "I;16", "I"):
                return None
            arr = np.asarray(img)
            break
        except Exception:
            continue
    else:
        return None
    if arr.ndim != 2 or arr.shape[1] == 0:
        return None
    if arr.dtype == np.int32:
        arr = arr.astype(np.uint16)
    if ts in _J2K and arr.dtype == np.uint16:
        # Pillow scales 9-15 bit JPEG 2000 samples up to the full 16 bits; the windows and LUTs
        # expect the stored values, so shift back by what the codestream declares.
        precision = _j2k_precision(frame)
        if precision is None:
            return None
        arr = arr >> np.uint16(16 - precision) if precision < 16 else arr
    return arr, cols / arr.shape[1]


def _same_rounding(size: int, level: int) -> bool:
    """Pillow's reduced size ((size + 2^level / 2) // 2^level) equals OpenJPEG's (ceil(size / 2^level))."""
    power = 1 << level
    return (size + power // 2) // power == -(-size // power)


def _j2k_precision(frame: bytes) -> int | None:
    """Bits of the first component from the codestream's SIZ marker; None if absent or signed."""
    at = frame.find(b"\xff\x51", 0, 4096)  # SIZ follows SOC (J2K) or sits early in the jp2c box (JP2)
    if at < 0 or len(frame) <= at + 40:
        return None
    ssiz = frame[at + 40]  # FF51 Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz, then Ssiz
    return None if ssiz & 0x80 else (ssiz & 0x7F) + 1


def _pool_factor(ds: Dataset, target_size: int | None) -> int:
    """k for averaging k x k blocks of stored values before any float maths (k = the largest factor
    that keeps both sides >= target_size), or 0 where that would not match the full-size path: a
    Modality or VOI LUT or a sigmoid VOI (not linear, so averaging first would change the values).

    Linear windows commute with averaging except in blocks that straddle a clipping bound (a tiny,
    smoothing-sized difference, the same kind the reduced JPEG 2000 / JPEG decodes make). A remainder
    of fewer than k rows/columns at the bottom/right edge is left out of the means."""
    if not target_size or "ModalityLUTSequence" in ds or "VOILUTSequence" in ds:
        return 0
    if str(ds.get("VOILUTFunction", "") or "").upper() == "SIGMOID":
        return 0
    factor = min(min(int(ds.Rows), int(ds.Columns)) // target_size, 64)
    return factor if factor >= 2 else 0


def _poolable(raw: np.ndarray) -> bool:
    return raw.ndim == 2 and np.issubdtype(raw.dtype, np.integer) and raw.dtype.itemsize <= 2


def _acc_type(dtype: np.dtype[Any]) -> type[np.integer[Any]]:
    # uint32 cannot overflow: 64 x 64 x 65535 < 2^32; int64 for signed data.
    return np.int64 if np.issubdtype(dtype, np.signedinteger) else np.uint32


def _pool_rows(
    chunks: Iterable[np.ndarray], factor: int, out_w: int, acc_type: type[np.integer[Any]]
) -> tuple[np.ndarray, tuple[float, float]]:
    """Block means of an image given as consecutive row chunks (each a multiple of `factor` rows, but
    the last), and the (min, max) stored values of ALL its pixels: the auto-window needs the extremes
    of the full image, not of the means. Integer sums, rows first as k whole-row adds over contiguous
    memory (which numpy vectorises well), then the columns of the k-times smaller result."""
    sums: list[np.ndarray] = []
    low, high = math.inf, -math.inf
    for chunk in chunks:
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
        n = chunk.shape[0] // factor
        if n == 0:
            continue
        blocks = chunk[: n * factor, : out_w * factor].reshape(n, factor, out_w * factor)
        acc = blocks[:, 0, :].astype(acc_type)
        for i in range(1, factor):
            np.add(acc, blocks[:, i, :], out=acc)
        sums.append(acc.reshape(n, out_w, factor).sum(axis=2, dtype=acc_type))
    means = np.concatenate(sums).astype(np.float32)
    means *= np.float32(1 / (factor * factor))
    return means, (low, high)


def _stream_block_mean(path: Path, ds: Dataset, factor: int) -> tuple[np.ndarray, tuple[float, float]] | None:
    """Native little-endian unsigned first frame, pooled while it is read: the full-size image is
    never in memory (a 2.5k x 3k 16-bit frame is 15 MB; pydicom would hold it twice). None when the
    layout is anything else, so pydicom decides."""
    bits_alloc, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
    if ds.get("PixelRepresentation", 0) != 0 or bits_alloc not in (8, 16):
        return None
    elem: Any = ds.get_item("PixelData", keep_deferred=True)
    offset = getattr(elem, "value_tell", None)
    if getattr(elem, "value", None) is not None or offset is None:
        return None  # read into memory already (small), or not from this file
    rows, cols = int(ds.Rows), int(ds.Columns)
    dtype = np.dtype("<u2") if bits_alloc == 16 else np.dtype(np.uint8)
    # Bits above Bits Stored may hold overlays or garbage; pydicom masks them off, and so do we.
    mask = (1 << bits_stored) - 1 if bits_stored < bits_alloc else None
    step = factor * _STREAM_BLOCK_ROWS

    def chunks(fh: Any) -> Iterator[np.ndarray]:
        for start in range(0, rows, step):
            count = min(step, rows - start) * cols
            chunk = np.fromfile(fh, dtype=dtype, count=count)
            if chunk.size != count:
                raise EOFError("Pixel Data shorter than declared")
            if mask is not None:
                np.bitwise_and(chunk, dtype.type(mask), out=chunk)
            yield chunk.reshape(-1, cols)

    try:
        with open(path, "rb") as fh:
            fh.seek(int(offset))
            return _pool_rows(chunks(fh), factor, cols // factor, np.uint32)
    except (OSError, EOFError, ValueError):
        return None


def _to_unit(
    raw: np.ndarray, ds: Dataset, name: str, *, extremes: tuple[float, float] | None = None
) -> np.ndarray:
    """Stored values -> float32 [0, 1], 0 black. In-place float32 maths: no float64 full-size copies.

    `extremes`: (min, max) stored values when `raw` holds block means (_block_mean) of an integer image."""
    if raw.ndim != 2:
        raise InputRejected(reasons.UNSUPPORTED_PIXEL_FORMAT, f"{name}: decoded shape {raw.shape}")
    arr: np.ndarray = raw
    rescaled = False
    if "ModalityLUTSequence" in ds:
        arr = apply_modality_lut(arr, ds)  # a lookup table: integer output
    else:
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        if (slope, intercept) != (1.0, 0.0):
            arr = arr.astype(np.float32)
            arr *= np.float32(slope)
            arr += np.float32(intercept)
            rescaled = True
            if extremes is not None:
                ends = sorted(v * slope + intercept for v in extremes)
                extremes = (ends[0], ends[1])
    out = _voi(arr, ds, rescaled, extremes)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        np.subtract(np.float32(1), out, out=out)
    return out


def _voi(
    arr: np.ndarray, ds: Dataset, rescaled: bool, extremes: tuple[float, float] | None = None
) -> np.ndarray:
    if "VOILUTSequence" in ds and np.issubdtype(arr.dtype, np.integer):
        lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) or 16
        out = apply_voi_lut(arr, ds, index=0, prefer_lut=True).astype(np.float32)
        out *= np.float32(1 / ((1 << lut_bits) - 1))
        return np.clip(out, 0, 1, out=out)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    # The decoded frame is ours alone, so float32 maths may work in place on it.
    out = arr if arr.dtype == np.float32 else arr.astype(np.float32)
    if center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if function == "SIGMOID":
            out -= np.float32(center)
            out *= np.float32(-4 / width)
            np.exp(out, out=out)
            out += np.float32(1)
            np.reciprocal(out, out=out)
            return out
        if function == "LINEAR_EXACT":
            out -= np.float32(center - width / 2)
            out *= np.float32(1 / width)
        else:  # LINEAR, PS3.3 C.11.2.1.2.1
            span = max(width - 1, 1e-6)
            out -= np.float32(center - 0.5)
            out *= np.float32(1 / span)
            out += np.float32(0.5)
        return np.clip(out, 0, 1, out=out)
    bits = int(ds.get("BitsStored") or 8)
    integer = np.issubdtype(arr.dtype, np.integer) or extremes is not None  # block means of integers
    if not rescaled and bits <= 8 and integer and ds.get("PixelRepresentation", 0) == 0:
        # 8-bit with no window: the full range is the display range, as for an 8-bit PNG.
        out *= np.float32(1 / ((1 << bits) - 1))
        return np.clip(out, 0, 1, out=out)
    # No window given: stretch the values present (what viewers do for "auto window").
    low, high = extremes if extremes is not None else (float(out.min()), float(out.max()))
    out -= np.float32(low)
    out *= np.float32(1 / max(high - low, 1e-6))
    return out


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, pydicom.multival.MultiValue | list | tuple):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _meta(ds: Dataset) -> ImageMeta:
    def text(key: str) -> str | None:
        value = ds.get(key)
        if value is None or value == "":
            return None
        return str(value).strip() or None

    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    pixel_spacing: tuple[float, float] | None = None
    if spacing is not None and len(spacing) == 2:
        try:
            pixel_spacing = (float(spacing[0]), float(spacing[1]))
        except (TypeError, ValueError):
            pixel_spacing = None
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) or None
    extra: dict[str, str] = {}
    for key, label in (
        ("NumberOfFrames", "frames"),
        ("SOPClassUID", "sop_class_uid"),
        ("Manufacturer", "manufacturer"),
        ("IssuerOfPatientID", "IssuerOfPatientID"),  # part of the patient's identity (appliance.pseudonym)
    ):
        value = text(key)
        if value:
            extra[label] = value
    return ImageMeta(
        format="dicom",
        sop_instance_uid=text("SOPInstanceUID"),
        study_instance_uid=text("StudyInstanceUID"),
        series_instance_uid=text("SeriesInstanceUID"),
        modality=text("Modality"),
        view_position=text("ViewPosition"),
        body_part=text("BodyPartExamined"),
        acquired_at=acquisition_time(ds),
        patient_id=text("PatientID"),
        patient_name=text("PatientName"),
        location=text("CurrentPatientLocation") or text("StationName"),
        rows=_int(ds, "Rows") or None,
        columns=_int(ds, "Columns") or None,
        bits_stored=_int(ds, "BitsStored") or None,
        photometric=text("PhotometricInterpretation"),
        transfer_syntax=ts,
        pixel_spacing_mm=pixel_spacing,
        extra=extra,
    )


def acquisition_time(ds: Dataset) -> str | None:
    """ISO 8601 from Acquisition, else Content, else Study date/time; with TimezoneOffsetFromUTC if any.

    None when none of them holds a real date (missing, unparseable or a placeholder)."""
    offset = _tz(str(ds.get("TimezoneOffsetFromUTC", "") or ""))
    dt_value = str(ds.get("AcquisitionDateTime", "") or "").strip()
    if dt_value:
        parsed = _parse_dt(dt_value[:8], dt_value[8:])
        if parsed:
            # A DT's own offset (…120000+0100) is the most specific; TimezoneOffsetFromUTC otherwise.
            own = _tz(dt_value[-5:]) if len(dt_value) > 13 else None
            return parsed + (own or offset or "")
    for date_key, time_key in (
        ("AcquisitionDate", "AcquisitionTime"),
        ("ContentDate", "ContentTime"),
        ("StudyDate", "StudyTime"),
    ):
        parsed = _parse_dt(str(ds.get(date_key, "") or ""), str(ds.get(time_key, "") or ""))
        if parsed:
            return parsed + (offset or "")
    return None


def _parse_dt(date: str, time: str) -> str | None:
    date = date.strip()
    if len(date) != 8 or not date.isdigit():
        return None
    # A DT value may carry its own offset (e.g. 120000+0100): keep only the time part here.
    time = time.strip().split("+")[0].split("-")[0]
    whole, _, frac = time.partition(".")
    whole = (whole + "000000")[:6] if whole.isdigit() else "000000"
    try:
        stamp = datetime.strptime(date + whole, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    if not _FIRST_PLAUSIBLE_YEAR <= stamp.year <= datetime.now().year + 1:
        return None  # a placeholder: unknown, not 1901
    iso = stamp.isoformat()
    if frac.isdigit():
        iso += "." + frac[:6]
    return iso


def _tz(value: str) -> str | None:
    value = value.strip()
    if len(value) == 5 and value[0] in "+-" and value[1:].isdigit():
        return f"{value[:3]}:{value[3:]}"
    return None
