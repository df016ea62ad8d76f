"""Stored DICOM values to what the model sees: float32 in [0, 1], 0 black.

Modality LUT or Rescale Slope/Intercept, then VOI LUT or window (or the values present stretched when the
file gives none), then MONOCHROME1 inverted (PS3.3 C.11). A table or value the file gets wrong is refused
as the file's fault, naming it and why; float32 maths in place, no full-size float64 copies.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from appliance.errors import InputRejected
from appliance.ingest import reasons


@contextlib.contextmanager
def _lookup_table(name: str, what: str) -> Iterator[None]:
    """A lookup table in the file that pydicom cannot apply (no LUT Data, a descriptor of the wrong
    length or depth, data shorter than the descriptor says) is the file's fault: refused with why."""
    try:
        yield
    except (
        AttributeError,
        IndexError,
        KeyError,
        TypeError,
        ValueError,
        OverflowError,
        NotImplementedError,  # pydicom: a LUT entry depth it does not know (the standard allows 8, 10-16)
        struct.error,
    ) as exc:
        raise InputRejected(
            reasons.INVALID_DICOM, f"{name}: unusable {what}: {type(exc).__name__}: {exc}"
        ) from exc


def to_unit(
    raw: np.ndarray, ds: Dataset, name: str, *, extremes: tuple[float, float] | None = None
) -> np.ndarray:
    """Stored values -> float32 [0, 1], 0 black. In-place float32 maths: no float64 full-size copies.

    `extremes`: (min, max) stored values when `raw` holds block means (_block_mean) of an integer image."""
    if raw.ndim != 2:
        raise InputRejected(reasons.UNSUPPORTED_PIXEL_FORMAT, f"{name}: decoded shape {raw.shape}")
    arr: np.ndarray = raw
    rescaled = False
    if "ModalityLUTSequence" in ds:
        with _lookup_table(name, "Modality LUT"):
            arr = apply_modality_lut(arr, ds)  # a lookup table: integer output
    else:
        slope, intercept = _rescale(ds, name)
        if (slope, intercept) != (1.0, 0.0):
            arr = arr.astype(np.float32)
            arr *= np.float32(slope)
            arr += np.float32(intercept)
            rescaled = True
            if extremes is not None:
                ends = sorted(v * slope + intercept for v in extremes)
                extremes = (ends[0], ends[1])
    out = _voi(arr, ds, name, rescaled, extremes)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        np.subtract(np.float32(1), out, out=out)
    return out


def _voi(
    arr: np.ndarray, ds: Dataset, name: str, rescaled: bool, extremes: tuple[float, float] | None = None
) -> np.ndarray:
    if "VOILUTSequence" in ds and np.issubdtype(arr.dtype, np.integer):
        with _lookup_table(name, "VOI LUT"):
            return _voi_table(arr, ds)
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


def _rescale(ds: Dataset, name: str) -> tuple[float, float]:
    """Rescale Slope and Intercept (one number each); anything else is the file's fault, said with why."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        value = ds.get(keyword)
        try:
            number = default if value is None or value == "" else float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not np.isfinite(number):
            raise InputRejected(reasons.INVALID_DICOM, f"{name}: {keyword} {value!r} is not one number")
        values.append(number)
    if values[0] == 0:
        raise InputRejected(reasons.INVALID_DICOM, f"{name}: RescaleSlope 0 would make every pixel the same")
    return values[0], values[1]


def _voi_table(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """The first VOI LUT applied to integer stored values, as float32 [0, 1] (PS3.3 C.11.2.1.1).

    Not pydicom's apply_voi: it indexes an 8-bit table with 8-bit indices, so a 4096-entry table of 8-bit
    values wrapped every stored value above 255 (a chest film came out black and was refused as not a
    chest X-ray). Raises what `_lookup_table` turns into a refusal."""
    item = ds.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    # The descriptor's VR is US or SS by the pixels' sign, and writers get it wrong both ways: the number
    # of entries is unsigned (0: 65536), the first mapped value has the pixels' sign.
    entries = (entries & 0xFFFF) or 1 << 16
    first &= 0xFFFF
    if int(ds.get("PixelRepresentation", 0) or 0) == 1 and first >= 0x8000:
        first -= 0x10000
    if bits != 8 and not 10 <= bits <= 16:
        raise ValueError(f"{bits} bits per LUT entry (8 or 10-16 allowed)")
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words in the dataset's byte order
        little = ds.original_encoding[1]
        if little is None:
            raise ValueError("LUT Data in OW of unknown byte order")
        table = np.frombuffer(data, dtype="<u2" if little else ">u2")
    else:
        table = np.asarray(list(data) if isinstance(data, pydicom.multival.MultiValue | list) else [data])
    if table.size < entries:
        raise ValueError(f"LUT Data holds {table.size} of {entries} entries")
    lut = table[:entries].astype(np.float32) * np.float32(1 / ((1 << bits) - 1))
    index = arr.astype(np.int32)
    index -= np.int32(first)
    np.clip(index, 0, entries - 1, out=index)
    out = lut[index]
    return np.clip(out, 0, 1, out=out)


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, pydicom.multival.MultiValue | list | tuple):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None
