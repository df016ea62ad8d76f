"""Fuzzing `read_image` in-process: 240 seeded mutations of the real files, plus regression cases.

Every case ends in a decoded image or InputRejected with a reason that names the file; nothing else is
allowed (another exception type, a non-finite pixel, memory beyond the pixel limit, a slow case). The
regression tests below are the crashes the fuzzer found, kept as plain files built from real data.
"""

from __future__ import annotations

import io
import random
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from appliance.errors import InputRejected
from appliance.ingest import read_image, reasons
from appliance.ingest.complete import incomplete_reason
from appliance.ingest.spool_keys import FileIdentity
from testsupport.data import cxr_data
from testsupport.mutate import GENERIC, Mutator, deflate_bomb, png_bomb
from tools.quality.fuzz import NATIVE_DX, run_fuzz, seed_corpus

MAX_PIXELS = 4_000_000  # tight, so a memory bound of a few tens of MB is meaningful


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return seed_corpus(cxr_data(), tmp_path_factory.mktemp("corpus"))


def test_seed_corpus_reaches_every_decoder(corpus: list[Path]) -> None:
    syntaxes = {
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for p in corpus
        if p.suffix == ".dcm"
    }
    # JPEG baseline, implicit + explicit VR native, RLE and JPEG 2000: Pillow, numpy, pydicom, openjpeg.
    assert {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.90",
    } <= syntaxes
    assert {p.suffix for p in corpus} == {".dcm", ".png", ".jpg"}


def test_240_mutations_end_in_an_image_or_a_reason(corpus: list[Path], tmp_path: Path) -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = run_fuzz(Mutator(seed=20261124).cases(corpus, 240), tmp_path, max_pixels=MAX_PIXELS)
    assert report.cases == 240
    assert not report.crashes, "\n".join(f"{c.name}: {c.reason}: {c.detail}" for c in report.crashes)
    # A fuzzer that only ever hits the same refusal tests nothing: many reasons, some decodes.
    assert report.rejected >= 100 and report.decoded >= 20, report.to_dict()
    assert len(report.reasons) >= 7, report.reasons
    assert {"png-bomb", "deflate-bomb", "lying-transfer-syntax", "malformed-sequence"} <= set(
        report.mutations
    )
    assert report.slowest_s < 10, (report.slowest_case, report.slowest_s)
    assert report.traced_peak_mb < MAX_PIXELS * 16 / 1e6 + 64
    # Untraced (C) memory too: the bombs inflate to GBs if anything decodes them.
    assert report.rss_peak_mb - rss_before < 400, (rss_before, report.rss_peak_mb)


def test_same_seed_same_cases(corpus: list[Path]) -> None:
    first = [(c.name, c.data) for c in Mutator(5).cases(corpus[:3], 12)]
    again = [(c.name, c.data) for c in Mutator(5).cases(corpus[:3], 12)]
    other = [c.data for c in Mutator(6).cases(corpus[:3], 12)]
    assert first == again and [d for _, d in first] != other


# -- regressions: crashes the fuzzer found ------------------------------------------------------------


def native() -> Path:
    return cxr_data() / "dicom" / NATIVE_DX


def edited(tmp_path: Path, name: str, **tags: object) -> Path:
    ds = pydicom.dcmread(native())
    for key, value in tags.items():
        setattr(ds, key, value)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=False)
    return path


def refused(path: Path, reason: str) -> InputRejected:
    with pytest.raises(InputRejected) as caught:
        read_image(path, max_pixels=MAX_PIXELS)
    assert caught.value.reason == reason, caught.value
    assert path.name in caught.value.detail
    return caught.value


def test_multi_valued_or_empty_rows_is_invalid_not_a_type_error(tmp_path: Path) -> None:
    refused(edited(tmp_path, "rows-list.dcm", Rows=[1024, 1024]), reasons.INVALID_DICOM)
    refused(edited(tmp_path, "rows-empty.dcm", Rows=None), reasons.INVALID_DICOM)
    bits = edited(tmp_path, "bits-list.dcm", BitsAllocated=[8, 8])
    refused(bits, reasons.UNSUPPORTED_PIXEL_FORMAT)


def test_sequence_item_with_a_4_gb_length_is_refused_without_allocating_it(tmp_path: Path) -> None:
    import tracemalloc

    data = native().read_bytes()
    # After the first dataset element: an SQ of undefined length holding one item that claims ~4 GB.
    start = 132 + 12 + struct.unpack_from("<I", data, 140)[0]
    first_end = start + 8 + struct.unpack_from("<H", data, start + 6)[0]
    bad = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    bad += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFF0) + bytes(24)
    path = tmp_path / "sequence.dcm"
    path.write_bytes(data[:first_end] + bad + data[first_end:])
    tracemalloc.start()
    try:
        with pytest.raises(InputRejected):  # the SQ swallows the rest: "no pixel data" or "invalid DICOM"
            read_image(path, max_pixels=MAX_PIXELS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64e6, f"{peak / 1e6:.0f} MB allocated for a 1 MB file"


def test_lying_transfer_syntax_deflated_is_invalid_not_a_zlib_error(tmp_path: Path) -> None:
    data = native().read_bytes()
    meta = pydicom.dcmread(native(), stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    buffer.write(bytes(128) + b"DICM")
    pydicom.filewriter.write_file_meta_info(buffer, meta, enforce_standard=False)  # type: ignore[arg-type]
    start = 132 + 12 + struct.unpack_from("<I", data, 140)[0]
    path = tmp_path / "lying.dcm"
    path.write_bytes(buffer.getvalue() + data[start:])
    refused(path, reasons.INVALID_DICOM)


def test_deflate_bomb_refused_everywhere_a_header_is_read(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "bomb.dcm"
    path.write_bytes(deflate_bomb(random.Random(1), native().read_bytes()))
    assert path.stat().st_size < 2_000_000  # 256 MB of Pixel Data inside
    tracemalloc.start()
    try:
        refused(path, reasons.IMAGE_TOO_LARGE)
        key = FileIdentity.of(path, "dicom").key
        assert key is not None and key.startswith("sha256:")  # the spool hashes it instead of inflating
        incomplete_reason(path)  # the watcher's completeness check
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64e6, f"{peak / 1e6:.0f} MB allocated checking a deflate bomb"


def test_a_real_deflated_dicom_is_read_and_counted_complete(tmp_path: Path) -> None:
    ds = pydicom.dcmread(native())
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    # It used to wait forever: "Pixel Data holds 650,016 bytes" (offsets into the inflated copy).
    assert incomplete_reason(path) is None
    image = read_image(path)
    np.testing.assert_allclose(image.pixels, read_image(native()).pixels)


def test_png_bomb_refused_before_decoding(tmp_path: Path) -> None:
    real_png = next((cxr_data() / "images").rglob("*.png"))
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(random.Random(0), real_png.read_bytes()))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    error = refused(path, reasons.IMAGE_TOO_LARGE)
    assert "declared" in error.detail
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50_000  # kB


@pytest.mark.parametrize("mutation", sorted(GENERIC))
def test_generic_mutations_change_the_bytes(mutation: str) -> None:
    data = bytes(range(256)) * 64
    assert GENERIC[mutation](random.Random(1), data) != data


def test_native_pixels_labelled_jpeg_lossless_are_refused_before_gdcm(tmp_path: Path) -> None:
    """GDCM aborted the whole process (C++ exception through SWIG, SIGABRT) on this; run in a child."""
    data = native().read_bytes()
    meta = pydicom.dcmread(native(), stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
    buffer = io.BytesIO()
    buffer.write(bytes(128) + b"DICM")
    pydicom.filewriter.write_file_meta_info(buffer, meta, enforce_standard=False)  # type: ignore[arg-type]
    start = 132 + 12 + struct.unpack_from("<I", data, 140)[0]
    path = tmp_path / "relabelled.dcm"
    path.write_bytes(buffer.getvalue() + data[start:])
    code = (
        "import sys; from pathlib import Path; from appliance.errors import InputRejected\n"
        "from appliance.ingest import read_image\n"
        "try:\n    read_image(Path(sys.argv[1]), target_size=256)\n"
        "except InputRejected as exc:\n    print('REJECTED', exc.reason)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"the reader process died ({proc.returncode}): {proc.stderr[-500:]}"
    assert "REJECTED invalid DICOM" in proc.stdout, proc.stdout


def test_corrupt_file_meta_length_allocates_nothing_big(corpus: list[Path], tmp_path: Path) -> None:
    """Fuzz case seed 7 #279 (a bit flip in the File Meta): pydicom's own File Meta reader asked for 1 GB."""
    import tracemalloc

    case = next(Mutator(7).cases(corpus, 280, start=279))
    assert case.name == "derived-explicit16:bitflip#279"
    path = tmp_path / "meta.dcm"
    path.write_bytes(case.data)
    tracemalloc.start()
    try:
        with pytest.raises(InputRejected):
            read_image(path)
        FileIdentity.of(path, "dicom")  # the spool's identity of the file
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64e6, f"{peak / 1e6:.0f} MB allocated for a {len(case.data) / 1e3:.0f} kB file"


def test_hostile_codestreams_are_refused_before_any_decoder_allocates(
    corpus: list[Path], tmp_path: Path
) -> None:
    """Hardening II, High 3, as a fuzz class: JPEG baseline (the real DICOMs), JPEG 2000 and JPEG-LS
    DICOMs whose codestream declares other dimensions than the tags (30000 x 30000, the maximum, zero,
    one row more) are refused from the headers, quickly and without allocating the declared size."""
    from pydicom.uid import JPEGLSLossless

    from testsupport.mutate import Case, codestream_lies

    sources = [p for p in corpus if p.suffix == ".dcm"]
    jls = pydicom.dcmread(next(p for p in corpus if p.name == "derived-explicit16.dcm"))
    jls.compress(JPEGLSLossless)
    jls.save_as(tmp_path / "derived-jls.dcm", enforce_file_format=True)
    sources.append(tmp_path / "derived-jls.dcm")
    cases = [
        Case(f"{p.stem[:30]}:{name}", "dicom", name, data)
        for p in sources
        for name, data in codestream_lies(p.read_bytes())
    ]
    kinds = {c.name.split(":")[0] for c in cases}
    assert len(kinds) >= 3, kinds  # JPEG baseline, JPEG 2000 and JPEG-LS codestreams at least
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = run_fuzz(cases, tmp_path / "run", max_pixels=MAX_PIXELS)
    assert not report.crashes, "\n".join(f"{c.name}: {c.reason}: {c.detail}" for c in report.crashes)
    assert report.decoded == 0 and report.rejected == len(cases), report.to_dict()
    assert set(report.reasons) <= {reasons.IMAGE_TOO_LARGE, reasons.HEADER_MISMATCH, reasons.INVALID_DICOM}
    assert report.slowest_s < 15, (report.slowest_case, report.slowest_s)
    assert report.rss_peak_mb - rss_before < 300, (rss_before, report.rss_peak_mb)
