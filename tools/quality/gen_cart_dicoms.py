"""Cart-like DICOMs for benchmarks: real chest X-rays upsampled to detector size with detector noise.

The shared data set holds 8-bit images of at most 1024 px; a bedside cart sends 2.5k x 3k, 12-16 bit,
in one of a handful of transfer syntaxes. This makes such files from the real images:
  - bicubic upsampling in float32 to `rows` x `cols`, mapped to the stored bit depth (12, 14 or 16);
  - quantum (Poisson-like, signal-dependent) plus electronic (Gaussian) noise, so compressed sizes
    and decode times resemble a detector's rather than a smooth upsampled picture's;
  - a window centre/width as a modality writes one, MONOCHROME2, DX, PA.
Syntaxes: uncompressed (explicit VR LE), JPEG lossless SV1 (python-gdcm), JPEG 2000 lossless and
lossy (pylibjpeg-openjpeg via pydicom), JPEG baseline (8-bit, Pillow). A syntax whose encoder is not
installed is skipped and named in `missing_encoders()`.

    python -m tools.quality.gen_cart_dicoms OUT_DIR [--count 4] [--syntax j2k ...]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    generate_uid,
)

# Short names used by the benchmark's JSON keys.
SYNTAXES: dict[str, str] = {
    "uncompressed": ExplicitVRLittleEndian,
    "jpeg_lossless": JPEGLosslessSV1,
    "j2k": JPEG2000Lossless,
    "j2k_lossy": JPEG2000,
    "jpeg_baseline": JPEGBaseline8Bit,
}
CART_SIZE = (3000, 2500)  # rows, cols: a 35 x 43 cm detector at ~140 um (the longer side is kept)


def _gdcm_available() -> bool:
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def missing_encoders() -> dict[str, str]:
    """Syntax name -> why it cannot be generated here."""
    missing: dict[str, str] = {}
    if not _gdcm_available():
        missing["jpeg_lossless"] = "python-gdcm not installed (JPEG lossless encoder)"
    try:
        import openjpeg  # noqa: F401
    except ImportError:
        missing["j2k"] = missing["j2k_lossy"] = "pylibjpeg-openjpeg not installed (JPEG 2000 encoder)"
    return missing


def detector_image(
    source: np.ndarray, rows: int, cols: int, bits: int, rng: np.random.Generator
) -> np.ndarray:
    """8-bit (H, W) -> uint16 (rows, cols) in [0, 2^bits) with quantum and electronic noise."""
    top = (1 << bits) - 1
    big = Image.fromarray(source.astype(np.float32), mode="F").resize((cols, rows), Image.Resampling.BICUBIC)
    signal = np.array(big, dtype=np.float32)
    # Keep the image off the extremes, as a detector's useful range is (no hard clipping at 0/top).
    signal *= np.float32(0.8 * top / 255.0)
    signal += np.float32(0.1 * top)
    # Quantum noise ~ sqrt(signal) (scaled so ~1% of full scale mid-grey) + electronic noise.
    gain = 0.01 * top / np.sqrt(0.5 * top)
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    noise *= np.sqrt(signal) * np.float32(gain)
    signal += noise
    signal += rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(0.002 * top)
    np.clip(signal, 0, top, out=signal)
    return np.rint(signal).astype(np.uint16)


def _dataset(pixels: np.ndarray, bits: int, syntax: str, seed: int) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    ds.PatientID, ds.PatientName = f"BENCH{seed:05d}", "Bench^Synthetic"
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.StationName = "bed-bench"
    ds.Manufacturer = "synthetic (tools/quality/gen_cart_dicoms.py)"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.ImagerPixelSpacing = [0.14, 0.14]
    top = (1 << bits) - 1
    # The window spans exactly the signal range set in detector_image: the model sees the source contrast.
    ds.WindowCenter, ds.WindowWidth = round(0.5 * top), round(0.8 * top)
    ds.PixelData = pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _gdcm_jpeg_lossless(uncompressed: Path, out: Path) -> None:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(uncompressed))
    if not reader.Read():
        raise RuntimeError(f"gdcm cannot read {uncompressed}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError("gdcm could not encode JPEG lossless")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(out))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"gdcm cannot write {out}")


def fitted_size(shape: tuple[int, ...], size: tuple[int, int]) -> tuple[int, int]:
    """The source's aspect ratio with its longer side at the longer side of `size` (never stretched)."""
    longest = max(size)
    scale = longest / max(shape[0], shape[1])
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def write_cart_dicom(
    source: np.ndarray, out: Path, syntax: str, *, seed: int, size: tuple[int, int] = CART_SIZE
) -> Path:
    """One file in `syntax` (a key of SYNTAXES) made from an 8-bit image."""
    rng = np.random.default_rng(seed)
    bits = (12, 14, 16)[seed % 3] if syntax != "jpeg_baseline" else 8
    rows, cols = fitted_size(source.shape, size)
    pixels = detector_image(source, rows, cols, bits if bits > 8 else 12, rng)
    if syntax == "jpeg_baseline":
        pixels8 = (pixels >> 4).astype(np.uint8)  # from the 12-bit image: what a cart's 8-bit export is
        ds = _dataset(pixels8, 8, syntax, seed)
        buffer = io.BytesIO()
        Image.fromarray(pixels8, mode="L").save(buffer, "JPEG", quality=90)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
        ds.save_as(out, enforce_file_format=True)
        return out
    ds = _dataset(pixels, bits, syntax, seed)
    if syntax == "uncompressed":
        ds.save_as(out, enforce_file_format=True)
    elif syntax == "jpeg_lossless":
        with tempfile.TemporaryDirectory() as tmp:
            plain = Path(tmp) / "plain.dcm"
            ds.save_as(plain, enforce_file_format=True)
            _gdcm_jpeg_lossless(plain, out)
    elif syntax == "j2k":
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        ds.save_as(out, enforce_file_format=True)
    elif syntax == "j2k_lossy":
        # ~20:1, a common lossy setting for a cart's teleradiology export.
        ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[20])
        ds.LossyImageCompression = "01"
        ds.save_as(out, enforce_file_format=True)
    else:
        raise ValueError(f"unknown syntax {syntax!r}; one of {sorted(SYNTAXES)}")
    return out


def load_grey(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def generate(
    sources: Sequence[Path],
    folder: Path,
    syntaxes: Sequence[str],
    *,
    size: tuple[int, int] = CART_SIZE,
) -> dict[str, list[Path]]:
    """For each syntax, one file per source image, named <syntax>/<index>.dcm."""
    missing = missing_encoders()
    made: dict[str, list[Path]] = {}
    for syntax in syntaxes:
        if syntax in missing:
            continue
        sub = folder / syntax
        sub.mkdir(parents=True, exist_ok=True)
        made[syntax] = [
            write_cart_dicom(load_grey(src), sub / f"{i:03d}.dcm", syntax, seed=i, size=size)
            for i, src in enumerate(sources)
        ]
    return made


def main(argv: Sequence[str] | None = None) -> int:
    from tools.training import dataset

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--syntax", action="append", choices=sorted(SYNTAXES))
    parser.add_argument("--data", help="CXR data folder (default: $CXR_DATA or ../shared/data/cxr)")
    args = parser.parse_args(argv)
    sources = frontal_sources(dataset.data_dir(args.data), args.count)
    made = generate(sources, args.out, args.syntax or list(SYNTAXES))
    for syntax, paths in made.items():
        print(f"{syntax}: {len(paths)} file(s) in {args.out / syntax}")
    for syntax, why in missing_encoders().items():
        print(f"{syntax}: skipped: {why}", file=sys.stderr)
    return 0


def frontal_sources(data: Path, count: int) -> list[Path]:
    """The first `count` frontal chest X-rays (PA/AP) of the shared set, in file order."""
    import csv

    with (data / "metadata.csv").open(encoding="utf-8") as fh:
        rows = [
            r
            for r in csv.DictReader(fh)
            if r["modality"] == "X-ray" and r["view"] in ("PA", "AP") and r["file"].startswith("images/")
        ]
    rows.sort(key=lambda r: r["file"])
    return [data / r["file"] for r in rows[:count]]


if __name__ == "__main__":
    sys.exit(main())
