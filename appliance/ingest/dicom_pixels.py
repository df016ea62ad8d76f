"""Decoding the first frame of a DICOM: the fast paths (block means straight from native files, GDCM for
JPEG lossless, reduced-resolution JPEG 2000/JPEG decodes). Stored values become display values in
appliance/ingest/dicom_values.py."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from appliance.errors import InputRejected

try:  # optional: the JPEG lossless fast paths (the pydicom plugins remain the fallback)
    import gdcm
except ImportError:  # pragma: no cover - python-gdcm is a dependency, but a missing one is survivable
    gdcm = None
try:  # BSD-3; its libjpeg-turbo 3 decodes lossless JPEG (process 14) bit-exact, ~2.5x faster than
    # GDCM, and without holding the GIL (a backlog's decode runs beside inference)
    import imagecodecs
except ImportError:  # pragma: no cover - a dependency, but a missing one only costs speed
    imagecodecs = None  # type: ignore[assignment]
from appliance.ingest import openjpeg, reasons
from appliance.ingest.dicom_checks import frame_count
from appliance.ingest.encapsulated import first_frame

_J2K = (JPEG2000, JPEG2000Lossless)
# Block rows per read: ~1.7 MB of a 2.5k-wide 16-bit image. Each read and each numpy call on it gives
# the GIL away and must win it back; in a backlog the loop's Python holds it in between, so fewer steps
# keep the decode moving (3000 x 2500 beside a busy Python thread: 16 rows 1.2 s, 32 rows 0.8 s). Not
# more: at 64 rows the blocks leave the CPU cache and the read alone takes 11 instead of 8 ms.
_STREAM_BLOCK_ROWS = 32
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


def decode_full_frame(ds: Dataset, name: str, ts: str) -> np.ndarray:
    """The first frame at full size through pydicom's plugins (the permissive one preferred per syntax)."""
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
    return arr


def decode_jpeg_lossless(path: Path, ds: Dataset) -> np.ndarray | None:
    """First frame straight into a numpy array: libjpeg-turbo (imagecodecs), else GDCM's region reader
    (about 3x faster than the pydicom plugin, which takes the pixels through a Python str and back);
    None -> the usual path. The codestream's SOF was checked against Rows/Columns before (dicom_checks)."""
    if ds.get("PixelRepresentation", 0) != 0 or ds.get("BitsAllocated") not in (8, 16):
        return None
    dtype = np.uint16 if ds.BitsAllocated == 16 else np.uint8
    turbo = _jpeg_lossless_turbo(path, ds, dtype)
    if turbo is not None or gdcm is None:
        return turbo
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
        out = np.empty((rows, cols), dtype=dtype)
        if reader.ComputeBufferLength() != out.nbytes or not reader.ReadIntoBuffer(out):
            return None
    except Exception:
        return None
    return out


def _jpeg_lossless_turbo(path: Path, ds: Dataset, dtype: type[np.unsignedinteger]) -> np.ndarray | None:
    if imagecodecs is None:
        return None
    try:
        frame = first_frame(path, ds, frame_count(ds))
        out = np.asarray(imagecodecs.jpeg8_decode(frame))
    except Exception:  # anything unusual: GDCM (and then the plugins) decide
        return None
    if out.shape != (int(ds.Rows), int(ds.Columns)) or out.dtype != dtype:
        return None
    return out


def decode_reduced(
    path: Path, ds: Dataset, ts: str, target_size: int | None
) -> tuple[np.ndarray, float] | None:
    """The first frame at 1/2^k size (libjpeg DCT scaling; JPEG 2000 resolution levels through OpenJPEG
    by ctypes, else Pillow) with its scale. None when the codec cannot or anything is unusual: then the
    full-size path decides."""
    if not target_size or ds.get("PixelRepresentation", 0) != 0 or not (ts == JPEGBaseline8Bit or ts in _J2K):
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    levels = math.floor(math.log2(min(rows, cols) / target_size)) if min(rows, cols) > target_size else 0
    if levels <= 0:
        return None
    try:
        frame = first_frame(path, ds, frame_count(ds))
    except Exception:
        return None
    # Deepest first; should the decoder refuse a level for any reason, one level less.
    wanted = tuple(range(min(levels, 5), 0, -1)) if ts in _J2K else (levels,)
    if ts in _J2K:
        for level in wanted:  # OpenJPEG without the GIL first, Pillow (holding it) when that fails
            try:
                stored = openjpeg.decode_reduced(frame, level)
            except Exception:  # anything unexpected from ctypes or numpy: Pillow decides
                stored = None
            if stored is not None and stored.shape == _reduced_shape(rows, cols, level):
                return stored, cols / stored.shape[1]
    for level in wanted:
        try:
            img = Image.open(io.BytesIO(frame))
            if ts == JPEGBaseline8Bit:
                img.draft("L", (cols >> level, rows >> level))
                # The whole frame in one decoder call, not 64 kB at a time: each call gives the GIL
                # away and must win it back (beside a busy Python thread: 24 instead of 42 ms).
                img.decodermaxblock = len(frame)
            else:
                _reduce_as_openjpeg_does(img, level)
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
    if ts in _J2K and arr.shape != _reduced_shape(rows, cols, level):
        return None  # not what OpenJPEG makes of this size: a Pillow that sizes it otherwise
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


def _reduced_shape(rows: int, cols: int, level: int) -> tuple[int, int]:
    """What OpenJPEG makes of a rows x cols image reduced by 2^level: ceil of each side."""
    return -(-rows // (1 << level)), -(-cols // (1 << level))


def _reduce_as_openjpeg_does(img: Image.Image, level: int) -> None:
    """Ask Pillow for a JPEG 2000 reduced by 2^level, sized as OpenJPEG sizes it.

    OpenJPEG decodes ceil(side / 2^level) samples; Pillow (13) allots (side + 2^level / 2) // 2^level and the
    decode fails ("broken data stream") wherever the two differ (2467 rows by 8: 309 vs 308). Reading one
    level shallower instead cost 3x the time (2467 x 3000: 70 vs 23 ms). Pillow's rounding is given the
    side for which it yields OpenJPEG's; the caller checks the size it got."""
    power = 1 << level
    img._size = tuple(-(-side // power) * power - power // 2 for side in img.size)  # type: ignore[assignment]
    img.reduce = level  # type: ignore[assignment,method-assign]


def _j2k_precision(frame: bytes) -> int | None:
    """Bits of the first component from the codestream's SIZ marker; None if absent or signed."""
    at = frame.find(b"\xff\x51", 0, 4096)  # SIZ follows SOC (J2K) or sits early in the jp2c box (JP2)
    if at < 0 or len(frame) <= at + 40:
        return None
    ssiz = frame[at + 40]  # FF51 Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz, then Ssiz
    return None if ssiz & 0x80 else (ssiz & 0x7F) + 1


def pool_factor(ds: Dataset, target_size: int | None) -> int:
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


def poolable(raw: np.ndarray) -> bool:
    return raw.ndim == 2 and np.issubdtype(raw.dtype, np.integer) and raw.dtype.itemsize <= 2


def acc_type(dtype: np.dtype[Any]) -> type[np.integer[Any]]:
    # uint32 cannot overflow: 64 x 64 x 65535 < 2^32; int64 for signed data.
    return np.int64 if np.issubdtype(dtype, np.signedinteger) else np.uint32


def pool_rows(
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


def stream_block_mean(path: Path, ds: Dataset, factor: int) -> tuple[np.ndarray, tuple[float, float]] | None:
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
            return pool_rows(chunks(fh), factor, cols // factor, np.uint32)
    except (OSError, EOFError, ValueError):
        return None
