"""read_image on the real DICOMs/PNGs/JPEGs, on re-encoded copies of them, and on every bad input."""

from __future__ import annotations

import errno
import io
import multiprocessing
import os
import struct
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

import gdcm
import numpy as np
import pydicom
import pytest
from PIL import Image, PngImagePlugin
from pydicom.dataset import FileMetaDataset
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless, JPEGLSLossless, RLELossless

from appliance.errors import InputRejected
from appliance.ingest import read_image, reasons
from appliance.interpret.gate import gate_on_tags
from tests.ingest.conftest import JPEG_BASELINE, MONOCHROME1, NATIVE_DX, grey, real


def rejected(path: Path, **kwargs: int) -> InputRejected:
    with pytest.raises(InputRejected) as caught:
        read_image(path, **kwargs)
    assert path.name in caught.value.detail  # every refusal names the file
    return caught.value


# -- the real files ---------------------------------------------------------------------------------


def test_real_dicoms_decode_to_unit_float(dicoms: list[Path]) -> None:
    for path in dicoms:
        img = read_image(path)
        assert img.pixels.dtype == np.float32 and img.pixels.shape == (1024, 1024)
        assert float(img.pixels.min()) >= 0.0 and float(img.pixels.max()) <= 1.0
        assert float(img.pixels.std()) > 0.1, "a chest X-ray has contrast"
        assert img.meta.format == "dicom" and img.meta.sop_instance_uid
        assert img.scale == 1.0


def test_jpeg_baseline_dicom_metadata_and_pixels() -> None:
    path = real(JPEG_BASELINE)
    img = read_image(path)
    m = img.meta
    assert (m.modality, m.view_position, m.body_part) == ("CR", "PA", "CHEST")
    assert m.sop_instance_uid == "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"
    assert m.study_instance_uid and m.series_instance_uid and m.patient_id
    assert m.transfer_syntax == "1.2.840.10008.1.2.4.50"
    assert m.pixel_spacing_mm == (0.168, 0.168)
    assert (m.rows, m.columns, m.bits_stored, m.photometric) == (1024, 1024, 8, "MONOCHROME2")
    assert m.acquired_at is None  # only a StudyDate, and that is the placeholder 19010101
    # 8 bit, no window: the stored values / 255, as pydicom itself decodes them.
    reference = pydicom.dcmread(path).pixel_array.astype(np.float32) / 255
    np.testing.assert_allclose(img.pixels, reference, atol=1e-6)


def test_monochrome1_is_inverted() -> None:
    mono2 = read_image(real(JPEG_BASELINE)).pixels
    mono1 = read_image(real(MONOCHROME1)).pixels
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_png_and_jpeg(real_png: Path, real_jpeg: Path) -> None:
    for path, fmt in ((real_png, "png"), (real_jpeg, "jpeg")):
        img = read_image(path)
        assert img.meta.format == fmt and img.meta.acquired_at is None and img.meta.sop_instance_uid is None
        np.testing.assert_allclose(img.pixels, grey(path) / 255.0, atol=1e-6)
        assert (img.meta.rows, img.meta.columns) == img.pixels.shape


# -- other transfer syntaxes, re-encoded from the real uncompressed DICOM ----------------------------


def _recompress(tmp_path: Path, uid: str, plugin: str) -> Path:
    ds = pydicom.dcmread(real(NATIVE_DX))
    ds.compress(uid, encoding_plugin=plugin)
    out = tmp_path / f"{uid}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def _gdcm_jpeg_lossless(tmp_path: Path) -> Path:
    reader = gdcm.ImageReader()
    reader.SetFileName(str(real(NATIVE_DX)))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    out = tmp_path / "jpeg-lossless.dcm"
    writer.SetFileName(str(out))
    assert writer.Write()
    return out


@pytest.mark.parametrize(
    ("uid", "plugin"),
    [(JPEG2000Lossless, "pylibjpeg"), (JPEGLSLossless, "pyjpegls"), (RLELossless, "pydicom"), ("gdcm", "")],
)
def test_lossless_syntaxes_match_the_original(
    tmp_path: Path, native_pixels: np.ndarray, uid: str, plugin: str
) -> None:
    path = _gdcm_jpeg_lossless(tmp_path) if uid == "gdcm" else _recompress(tmp_path, uid, plugin)
    img = read_image(path)
    assert img.meta.transfer_syntax != "1.2.840.10008.1.2"
    np.testing.assert_allclose(img.pixels, native_pixels.astype(np.float32) / 255, atol=1e-6)


def test_lossy_jpeg2000_and_reduced_resolution(tmp_path: Path, native_pixels: np.ndarray) -> None:
    ds = pydicom.dcmread(real(NATIVE_DX))
    ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[10])
    path = tmp_path / "j2k.dcm"
    ds.save_as(path)
    full = read_image(path)
    assert np.abs(full.pixels - native_pixels / 255).mean() < 0.01
    small = read_image(path, target_size=256)
    assert small.scale == 4.0 and small.pixels.shape == (256, 256)
    # A reduced decode is the same picture: compare with the full image averaged over 4x4 blocks.
    pooled = full.pixels.reshape(256, 4, 256, 4).mean(axis=(1, 3))
    assert np.abs(small.pixels - pooled).mean() < 0.02


def test_jpeg_baseline_reduced_resolution(real_jpeg: Path) -> None:
    for path in (real(JPEG_BASELINE), real_jpeg):
        full = read_image(path).pixels
        small = read_image(path, target_size=256)
        assert small.scale == 4.0 and small.pixels.shape == (256, 256)
        assert np.abs(small.pixels - full.reshape(256, 4, 256, 4).mean(axis=(1, 3))).mean() < 0.02


def _sixteen_bit(
    tmp_path: Path, *, photometric: str = "MONOCHROME2", window: bool = True
) -> tuple[Path, np.ndarray]:
    """A 12-bit-in-16 DICOM with Rescale Slope/Intercept (and a window) built from the real 8-bit DX."""
    ds = pydicom.dcmread(real(NATIVE_DX))
    px = ds.pixel_array.astype(np.int64)
    stored = (px * 15 + 100).astype(np.uint16)  # < 4096: fits 12 bits
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PhotometricInterpretation = photometric
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024"
    ds.PixelSpacing = None
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.139, 0.139]
    ds.AcquisitionDate, ds.AcquisitionTime, ds.TimezoneOffsetFromUTC = "20240301", "134501.25", "+0100"
    ds.StationName, ds.CurrentPatientLocation = "MOBILE-DR-2", "WARD 7 BED 12"
    modality = stored.astype(np.float64) * 0.5 - 1024
    if window:
        ds.WindowCenter, ds.WindowWidth = "-18", "1914"
        expected = np.clip((modality - (-18 - 0.5)) / (1914 - 1) + 0.5, 0, 1)
    else:
        expected = (modality - modality.min()) / (modality.max() - modality.min())
    ds.PixelData = stored.tobytes()
    path = tmp_path / f"sixteen-{photometric}-{window}.dcm"
    ds.save_as(path)
    if photometric == "MONOCHROME1":
        expected = 1 - expected
    return path, expected


@pytest.mark.parametrize(
    ("photometric", "window"), [("MONOCHROME2", True), ("MONOCHROME1", True), ("MONOCHROME2", False)]
)
def test_sixteen_bit_rescale_window(tmp_path: Path, photometric: str, window: bool) -> None:
    path, expected = _sixteen_bit(tmp_path, photometric=photometric, window=window)
    img = read_image(path)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-4)
    m = img.meta
    assert m.bits_stored == 12 and m.pixel_spacing_mm == (0.139, 0.139)
    assert m.acquired_at == "2024-03-01T13:45:01.25+01:00"
    assert m.location == "WARD 7 BED 12"


def test_multiframe_takes_the_first_frame(tmp_path: Path, native_pixels: np.ndarray) -> None:
    ds = pydicom.dcmread(real(NATIVE_DX))
    ds.NumberOfFrames = 2
    ds.PixelData = native_pixels.tobytes() + (255 - native_pixels).tobytes()
    path = tmp_path / "two-frames.dcm"
    ds.save_as(path)
    np.testing.assert_allclose(read_image(path).pixels, native_pixels / np.float32(255), atol=1e-6)


def test_dicom_without_preamble(tmp_path: Path, native_pixels: np.ndarray) -> None:
    ds = pydicom.dcmread(real(NATIVE_DX))
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    path = tmp_path / "bare"
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    img = read_image(path)
    np.testing.assert_allclose(img.pixels, native_pixels / np.float32(255), atol=1e-6)
    assert img.meta.sop_instance_uid == ds.SOPInstanceUID


def test_sixteen_bit_and_colour_png(tmp_path: Path, real_png: Path) -> None:
    base = grey(real_png)
    path16 = tmp_path / "sixteen.png"
    Image.fromarray(base.astype(np.uint16) * 257).save(path16)
    img = read_image(path16)
    assert img.meta.bits_stored == 16
    np.testing.assert_allclose(img.pixels, base / 255.0, atol=1e-6)
    for mode in ("RGB", "RGBA", "LA"):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(base).convert(mode).save(path)
        np.testing.assert_allclose(read_image(path).pixels, base / 255.0, atol=1e-6, err_msg=mode)
    palette = tmp_path / "p.png"
    Image.fromarray(base).convert("P").save(palette)
    np.testing.assert_allclose(read_image(palette).pixels, grey(palette) / 255.0, atol=1e-6)


# -- bad input -----------------------------------------------------------------------------------


def test_not_a_dicom(tmp_path: Path) -> None:
    path = tmp_path / "report.dcm"
    path.write_text("Patient report: not an image\n" * 20)
    assert rejected(path).reason == reasons.UNKNOWN_FORMAT
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + os.urandom(4000))
    assert rejected(garbage).reason in (reasons.INVALID_DICOM, reasons.TRUNCATED_DICOM, reasons.NO_PIXEL_DATA)


@pytest.mark.parametrize("name", [NATIVE_DX, JPEG_BASELINE])
def test_truncated_dicom(tmp_path: Path, name: str) -> None:
    data = real(name).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) // 2])
    exc = rejected(path)
    assert exc.reason == reasons.TRUNCATED_DICOM, exc


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    ds = pydicom.dcmread(real(NATIVE_DX))
    del ds.PixelData
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path)
    assert rejected(path).reason == reasons.NO_PIXEL_DATA


def test_unsupported_transfer_syntax(tmp_path: Path) -> None:
    ds = pydicom.dcmread(real(JPEG_BASELINE))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: a video syntax, no decoder
    path = tmp_path / "mpeg2.dcm"
    ds.save_as(path)
    exc = rejected(path)
    assert exc.reason == reasons.UNSUPPORTED_TRANSFER_SYNTAX and "MPEG2" in exc.detail


def test_colour_dicom_refused(tmp_path: Path) -> None:
    ds = pydicom.dcmread(real(NATIVE_DX))
    px = ds.pixel_array
    ds.PixelData = np.stack([px, px, px], axis=-1).tobytes()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    path = tmp_path / "rgb.dcm"
    ds.save_as(path)
    assert rejected(path).reason == reasons.UNSUPPORTED_PHOTOMETRIC


def test_empty_directory_and_symlink_loop(tmp_path: Path) -> None:
    empty = tmp_path / "empty.dcm"
    empty.touch()
    assert rejected(empty).reason == reasons.EMPTY_FILE
    folder = tmp_path / "folder.dcm"
    folder.mkdir()
    assert rejected(folder).reason == reasons.NOT_A_FILE
    loop = tmp_path / "loop.dcm"
    loop.symlink_to(loop)
    assert rejected(loop).reason == reasons.SYMLINK_LOOP


def test_truncated_png_and_jpeg(tmp_path: Path, real_png: Path, real_jpeg: Path) -> None:
    for src in (real_png, real_jpeg):
        data = src.read_bytes()
        path = tmp_path / src.name
        path.write_bytes(data[: len(data) // 2])
        assert rejected(path).reason == reasons.TRUNCATED_IMAGE


def _declared_huge_dicom(path: Path) -> None:
    """A complete, sparse 30000 x 30000 uncompressed DICOM (900 MB declared, almost no disk used)."""
    ds = pydicom.dcmread(real(NATIVE_DX))
    ds.Rows = ds.Columns = 30000
    ds.PixelData = b""
    ds.save_as(path)
    data = bytearray(path.read_bytes())
    # The empty Pixel Data element is last: patch its 4-byte length (implicit VR) to 900,000,000.
    assert data[-8:-4] == b"\xe0\x7f\x10\x00" and data[-4:] == b"\0\0\0\0"
    data[-4:] = struct.pack("<I", 30000 * 30000)
    path.write_bytes(bytes(data))
    os.truncate(path, len(data) + 30000 * 30000)


def _declared_huge_png(path: Path) -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 30001 * 8)  # a few rows; the decoder would never get that far
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_huge_images_refused_before_decoding(tmp_path: Path) -> None:
    dcm, png = tmp_path / "huge.dcm", tmp_path / "huge.png"
    _declared_huge_dicom(dcm)
    _declared_huge_png(png)
    assert dcm.stat().st_size > 900_000_000
    tracemalloc.start()
    try:
        for path in (dcm, png):
            exc = rejected(path)
            assert exc.reason == reasons.IMAGE_TOO_LARGE
            assert str(exc).startswith("image too large") and "30000 x 30000 declared" in str(exc)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, f"peak {peak / 1e6:.1f} MB while refusing"


# -- codestream headers that disagree with the tags (Hardening II) --------------------------------------


def _j2k(*, jp2: bool) -> bytes:
    """A real 16 x 16 JPEG 2000: a bare codestream, or wrapped in JP2 boxes."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buf, "JPEG2000", no_jp2=not jp2)
    return buf.getvalue()


def _patch_sof(frame: bytes, marker: bytes, rows: int, cols: int, *, twice: bool = False) -> bytes:
    """The frame with its SOFn / SOF55 declaring rows x cols; `twice`: a second such SOF after it."""
    at = frame.index(marker)
    length = struct.unpack_from(">H", frame, at + 2)[0]
    sof = bytearray(frame[at : at + 2 + length])
    struct.pack_into(">HH", sof, 5, rows, cols)
    if twice:
        return frame[: at + 2 + length] + bytes(sof) + frame[at + 2 + length :]
    return frame[:at] + bytes(sof) + frame[at + 2 + length :]


def _patch_siz(frame: bytes, rows: int, cols: int) -> bytes:
    """The codestream's SIZ declaring rows x cols, in 16-pixel tiles: were it ever decoded, OpenJPEG
    would refuse millions of tiles at once rather than allocate gigabytes."""
    data = bytearray(frame)
    at = data.index(b"\xff\x4f\xff\x51")
    struct.pack_into(">IIIIII", data, at + 8, cols, rows, 0, 0, 16, 16)
    return bytes(data)


def _hostile_dicom(tmp_path: Path, case: str) -> Path:
    """A 1024 x 1024 grey DICOM whose first frame's codestream declares something else."""
    if case.startswith("baseline"):
        ds = pydicom.dcmread(real(JPEG_BASELINE))
        frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
        if case == "baseline":
            frame = _patch_sof(frame, b"\xff\xc0", 60000, 60000)
        elif case == "baseline-second-sof":  # libjpeg reads the first SOF, Pillow the last
            frame = _patch_sof(frame, b"\xff\xc0", 60000, 60000, twice=True)
        else:  # "baseline-mismatch": within the pixel limit, but not what Rows/Columns say
            frame = _patch_sof(frame, b"\xff\xc0", 1024, 2048)
    elif case == "lossless":
        ds = pydicom.dcmread(_gdcm_jpeg_lossless(tmp_path))
        frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
        frame = _patch_sof(frame, b"\xff\xc3", 30000, 30000)
    elif case == "jpeg-ls":
        ds = pydicom.dcmread(_recompress(tmp_path, JPEGLSLossless, "pyjpegls"))
        frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
        frame = _patch_sof(frame, b"\xff\xf7", 30000, 30000)
    else:  # "j2k", "jp2", "j2k-mismatch": a JPEG 2000 frame in the JPEG baseline file's dataset
        ds = pydicom.dcmread(real(JPEG_BASELINE))
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        frame = _j2k(jp2=case == "jp2")
        if case != "j2k-mismatch":  # that one keeps its 16 x 16
            frame = _patch_siz(frame, 30000, 30000)
    ds.PixelData = pydicom.encaps.encapsulate([frame])
    path = tmp_path / f"{case}.dcm"
    ds.save_as(path)
    return path


# case: the reason, and what the refusal says the codestream declares
_HOSTILE = {
    "baseline": (reasons.IMAGE_TOO_LARGE, "60000 x 60000 declared by the JPEG SOF0"),
    "baseline-second-sof": (reasons.IMAGE_TOO_LARGE, "60000 x 60000 declared by the JPEG SOF0"),
    "baseline-mismatch": (reasons.HEADER_MISMATCH, "SOF0 declares 1024 x 2048 x 1 component(s)"),
    "lossless": (reasons.IMAGE_TOO_LARGE, "30000 x 30000 declared by the JPEG SOF3"),
    "jpeg-ls": (reasons.IMAGE_TOO_LARGE, "30000 x 30000 declared by the JPEG-LS SOF55"),
    "j2k": (reasons.IMAGE_TOO_LARGE, "30000 x 30000 declared by the JPEG 2000 SIZ"),
    "jp2": (reasons.IMAGE_TOO_LARGE, "30000 x 30000 declared by the JPEG 2000 SIZ"),
    "j2k-mismatch": (reasons.HEADER_MISMATCH, "SIZ declares 16 x 16 x 1 component(s)"),
}


@pytest.mark.parametrize("case", list(_HOSTILE))
def test_codestream_dimensions_are_checked_before_decoding(tmp_path: Path, case: str) -> None:
    reason, declared = _HOSTILE[case]
    path = _hostile_dicom(tmp_path, case)
    tracemalloc.start()
    started = time.monotonic()
    try:
        exc = rejected(path, target_size=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - started
    assert exc.reason == reason, exc
    assert declared in exc.detail, exc.detail
    if reason == reasons.HEADER_MISMATCH:
        assert "Rows/Columns/Samples per Pixel say 1024 x 1024 x 1" in exc.detail
    assert elapsed < 3, f"{elapsed:.1f} s to refuse"
    assert peak < 20_000_000, f"peak {peak / 1e6:.1f} MB while refusing"


def _png_header_only(path: Path, width: int, height: int, colour_type: int) -> None:
    """A PNG declaring width x height (8 bits per sample) followed by one tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_raster_decoding_memory_is_bounded_by_the_header(tmp_path: Path, real_jpeg: Path) -> None:
    # 59.3 megapixels: within the pixel limit, but RGBA decodes to 237 MB (835 MB peak on the way to grey).
    rgba = tmp_path / "rgba.png"
    _png_header_only(rgba, 7700, 7700, colour_type=6)
    # A real JPEG whose SOF is patched to 60000 x 60000.
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(_patch_sof(real_jpeg.read_bytes(), b"\xff\xc0", 60000, 60000))
    tracemalloc.start()
    started = time.monotonic()
    try:
        too_big = [rejected(path) for path in (rgba, bomb)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 3
    assert peak < 20_000_000, f"peak {peak / 1e6:.1f} MB while refusing"
    assert [exc.reason for exc in too_big] == [reasons.IMAGE_TOO_LARGE] * 2
    assert "7700 x 7700 RGBA declared (237 MB decoded > limit 120 MB)" in too_big[0].detail
    assert "60000 x 60000 declared" in too_big[1].detail
    # The budget is a 16-bit grey image at the pixel limit: grey passes it, colour of the same size not.
    base = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    for mode, pixels, ok in (("I;16", base * 16, True), ("L", base % 256, True), ("RGB", base % 256, False)):
        path = tmp_path / f"{mode.replace(';', '')}.png"
        Image.fromarray(pixels.astype(np.uint8) if mode != "I;16" else pixels).convert(mode).save(path)
        if ok:
            assert read_image(path, max_pixels=64 * 64).pixels.shape == (64, 64)
        else:
            assert rejected(path, max_pixels=64 * 64).reason == reasons.IMAGE_TOO_LARGE


def test_pillow_bomb_error_is_a_plain_refusal(real_png: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bomb(self: object) -> None:
        raise Image.DecompressionBombError("Image size (999999999 pixels) exceeds limit")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", bomb)
    assert rejected(real_png).reason == reasons.IMAGE_TOO_LARGE


def _read_as_nobody(path: str, queue: multiprocessing.Queue) -> None:
    try:
        os.setgid(65534)
        os.setuid(65534)
        read_image(Path(path))
        queue.put(("read", ""))
    except InputRejected as exc:
        queue.put((exc.reason, exc.detail))
    except Exception as exc:
        queue.put(("error", repr(exc)))


def test_unreadable_file(real_png: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="cxr-perm-"))
    try:
        folder.chmod(0o755)
        path = folder / "secret.png"
        path.write_bytes(real_png.read_bytes())
        path.chmod(0o000)
        if os.geteuid() != 0:
            exc = rejected(path)
            assert exc.reason == reasons.PERMISSION_DENIED
            return
        # root reads anything: drop to 'nobody' in a forked child (no exec needed) to test for real.
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_read_as_nobody, args=(str(path), queue))
        child.start()
        child.join(60)
        reason, detail = queue.get(timeout=5)
        if reason == "error" and str(errno.EPERM) in detail:
            pytest.skip("running as root and cannot drop privileges here: chmod 000 is not enforced")
        assert reason == reasons.PERMISSION_DENIED and "secret.png" in detail, (reason, detail)
    finally:
        for child_path in folder.iterdir():
            child_path.unlink()
        folder.rmdir()


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"AcquisitionDateTime": "20240301120000+0100"}, "2024-03-01T12:00:00+01:00"),
        (
            {"AcquisitionDateTime": "20240301120000.123", "TimezoneOffsetFromUTC": "-0500"},
            "2024-03-01T12:00:00.123-05:00",
        ),
        ({"AcquisitionDate": "20240301", "AcquisitionTime": "083000"}, "2024-03-01T08:30:00"),
        ({"StudyDate": "20240301"}, "2024-03-01T00:00:00"),
    ],
)
def test_acquisition_time_keeps_the_time_zone(tags: dict[str, str], expected: str) -> None:
    from pydicom.dataset import Dataset

    from appliance.ingest.dicom_meta import acquisition_time

    ds = Dataset()
    for key, value in tags.items():
        setattr(ds, key, value)
    assert acquisition_time(ds) == expected


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # pydicom, as the bad dates are written
@pytest.mark.parametrize("date", ["19010101", "19000101", "00000000", "2024XX01", "20241301", "99991231", ""])
def test_placeholder_or_unparseable_date_is_unknown(tmp_path: Path, date: str) -> None:
    ds = pydicom.dcmread(real(JPEG_BASELINE))  # its StudyDate is the anonymiser's 19010101
    ds.AcquisitionDate, ds.AcquisitionTime = date, "101500"
    ds.ContentDate, ds.ContentTime = "19010101", "000000"
    path = tmp_path / "dated.dcm"
    ds.save_as(path)
    assert read_image(path).meta.acquired_at is None
    ds.AcquisitionDate = "20240301"  # the same file with a real date keeps it
    ds.save_as(path)
    assert read_image(path).meta.acquired_at == "2024-03-01T10:15:00"


@pytest.mark.parametrize(
    ("sequence", "broken"),
    [
        ("ModalityLUTSequence", "no LUT Data"),
        ("ModalityLUTSequence", "short LUT Data"),
        ("VOILUTSequence", "short LUT Data"),
        ("VOILUTSequence", "two-value descriptor"),
    ],
)
def test_a_lookup_table_that_cannot_be_applied_is_refused_with_the_file_named(
    tmp_path: Path, sequence: str, broken: str
) -> None:
    """A mutated real DICOM (the soak's fuzz found the first): the file's fault, not a reader crash."""
    ds = pydicom.dcmread(real(NATIVE_DX))
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 12] if broken != "two-value descriptor" else [4096, 0]
    if broken == "short LUT Data":
        item.add_new("LUTData", "US", list(range(100)))  # 100 values where the descriptor says 4096
    elif broken == "two-value descriptor":
        item.add_new("LUTData", "US", list(range(4096)))
    item.ModalityLUTType = "US"
    setattr(ds, sequence, pydicom.Sequence([item]))
    if broken == "no LUT Data":
        item.add_new("LUTData", "OW", None)
    path = tmp_path / "lut.dcm"
    ds.save_as(path)
    with pytest.raises(InputRejected) as refused:
        read_image(path, max_pixels=50_000_000, target_size=256)
    assert refused.value.reason == reasons.INVALID_DICOM
    assert refused.value.detail.startswith("lut.dcm: unusable ") and "LUT" in refused.value.detail


# -- values the file states wrongly or in unusual ways (found by a review run, 12-01) -----------------


@pytest.mark.parametrize("kind", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path: Path, real_png: Path, kind: str, orientation: int) -> None:
    """A phone or camera stores the picture as the sensor saw it and says in EXIF how to turn it: read
    unturned, the film lies on its side (and the model reads another image)."""
    upright = Image.open(real_png).convert("L")
    # Stored turned the other way; the EXIF tag says how a viewer turns it back (Pillow's exif_transpose).
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    stored = upright.transpose(undo[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"turned.{kind.lower()}"
    stored.save(path, kind, exif=exif.tobytes(), **({"quality": 98} if kind == "JPEG" else {}))
    img = read_image(path)
    expected = np.asarray(upright, dtype=np.float32) / 255
    assert img.pixels.shape == expected.shape and (img.meta.rows, img.meta.columns) == expected.shape
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6 if kind == "PNG" else 0.1)
    if kind == "JPEG":
        assert float(np.abs(img.pixels - expected).mean()) < 0.01


@pytest.mark.parametrize(
    ("slope", "intercept", "said"),
    [
        (["1", "2"], "0", "RescaleSlope"),
        ("1", ["0", "5"], "RescaleIntercept"),
        ("0", "0", "RescaleSlope 0"),
    ],
)
def test_a_rescale_that_is_not_one_number_is_refused(
    tmp_path: Path, slope: object, intercept: object, said: str
) -> None:
    ds = pydicom.dcmread(real(NATIVE_DX))
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    path = tmp_path / "rescale.dcm"
    ds.save_as(path)
    refusal = rejected(path, target_size=256)
    assert refusal.reason == reasons.INVALID_DICOM and said in refusal.detail


@pytest.mark.parametrize("entries", [4096, 0])
def test_an_eight_bit_voi_lut_with_more_than_256_entries(tmp_path: Path, entries: int) -> None:
    """8-bit table values, 12-bit stored values: each stored value indexes the table whole (pydicom's
    apply_voi wrapped every index above 255)."""
    ds = pydicom.dcmread(real(NATIVE_DX))
    stored = (ds.pixel_array.astype(np.uint16) * 16).astype(np.uint16)  # 8 -> 12 bits
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = stored.tobytes()
    size = entries or 1 << 16
    item = pydicom.Dataset()
    item.LUTDescriptor = [entries, 0, 8]
    item.add_new("LUTData", "US", [min(i // 16, 255) for i in range(size)])
    ds.VOILUTSequence = pydicom.Sequence([item])
    path = tmp_path / "voi8.dcm"
    ds.save_as(path)
    expected = np.minimum(stored // 16, 255).astype(np.float32) / 255
    np.testing.assert_allclose(read_image(path).pixels, expected, atol=1e-6)


@pytest.mark.parametrize("bits", [9, 0, 17])
def test_a_voi_lut_entry_depth_the_standard_does_not_allow_is_refused(tmp_path: Path, bits: int) -> None:
    ds = pydicom.dcmread(real(NATIVE_DX))
    item = pydicom.Dataset()
    item.LUTDescriptor = [256, 0, bits]
    item.add_new("LUTData", "US", list(range(256)))
    ds.VOILUTSequence = pydicom.Sequence([item])
    path = tmp_path / "depth.dcm"
    ds.save_as(path)
    refusal = rejected(path, target_size=256)
    assert refusal.reason == reasons.INVALID_DICOM and "unusable VOI LUT" in refusal.detail


def test_a_coded_tag_holding_something_else_is_read_as_absent(tmp_path: Path) -> None:
    """Found by a review run: a name typed into BodyPartExamined was published and quoted in the refusal."""
    ds = pydicom.dcmread(real(NATIVE_DX))
    ds.BodyPartExamined, ds.ViewPosition = "DOE^JOHN 12345678", "PA"
    path = tmp_path / "coded.dcm"
    ds.save_as(path)
    meta = read_image(path, target_size=256).meta
    assert meta.body_part is None and meta.view_position == "PA"
    # Not published, not quoted, but not a chest code either: the gate still refuses it (a review run
    # found "ABDOMEN/PELVIS" passing once it was read as absent).
    refusal = gate_on_tags(meta)
    assert refusal is not None and refusal.reason == "not a chest X-ray" and "DOE" not in refusal.detail


def test_a_damaged_exif_block_leaves_the_picture_as_stored(tmp_path: Path, real_png: Path) -> None:
    path = tmp_path / "exif.png"
    Image.open(real_png).convert("L").save(path, "PNG", exif=b"MX\x00*\x00\x00\x00\x08\x00\x00")
    np.testing.assert_allclose(read_image(path).pixels, grey(real_png) / 255.0, atol=1e-6)


def test_a_voi_lut_descriptor_written_unsigned_for_signed_pixels(tmp_path: Path) -> None:
    """-2048 written as US 63488 (some writers): the first mapped value has the pixels' sign."""
    ds = pydicom.dcmread(real(NATIVE_DX))
    stored = ds.pixel_array.astype(np.int16) * 16 - 2048  # -2048 .. 2032, signed 12 bits
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
    ds.PixelData = stored.astype(np.int16).tobytes()
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 63488, 16])
    item.add_new("LUTData", "US", list(range(0, 65536, 16)))
    ds.VOILUTSequence = pydicom.Sequence([item])
    path = tmp_path / "signed-voi.dcm"
    ds.save_as(path)
    expected = ((stored.astype(np.int32) + 2048) * 16).astype(np.float32) / 65535
    np.testing.assert_allclose(read_image(path).pixels, expected, atol=1e-6)
