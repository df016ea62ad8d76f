"""Hostile files through the real `cxr-appliance process`: time and peak memory of each refusal.

    python -m tools.quality.hostile_bench --json artifacts/hostile.json

The files are the review's cases, built from the real data set ($CXR_DATA or ../shared/data/cxr) by the
fault suite's mutators: a deflate bomb (a few MB inflating to 268 MB of Pixel Data), a JPEG 2000 whose
codestream declares 30000 x 30000 inside a 1024 x 1024 DICOM, a JPEG whose SOF declares 60000 x 60000,
a PNG decompression bomb (30000^2), a 59-megapixel RGBA PNG, a 12-bit lossy JPEG DICOM (the form some CR
units still send) and, for scale, the real DICOMs. Each file runs in its own process (peak RSS from
the kernel: ru_maxrss of the child) so one case cannot hide in another's memory. Targets (issue
"Hardening II"): every hostile file refused in under 15 s and under 700 MB peak. Exit 1 when one is not.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from testsupport.mutate import codestream_lies, deflate_bomb, png_bomb
from tools.quality.fuzz import data_dir

REPO = Path(__file__).resolve().parents[2]
MAX_SECONDS, MAX_MB = 15.0, 700.0


def j2k_dicom(native: Path, side: int = 1024) -> bytes:
    ds = pydicom.dcmread(native)
    pixels = np.asarray(Image.fromarray(ds.pixel_array).resize((side, side)), dtype=np.uint16)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.compress(pydicom.uid.JPEG2000Lossless)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def with_dimensions(data: bytes, name: str) -> bytes:
    return dict(codestream_lies(data))[name]


def rgba_png(megapixels: int = 59) -> bytes:
    side = int((megapixels * 1e6) ** 0.5)
    out = io.BytesIO()
    Image.new("RGBA", (side, side), (128, 128, 128, 255)).save(out, format="PNG", compress_level=9)
    return out.getvalue()


def jpeg_sof(side: int = 60000) -> bytes:
    out = io.BytesIO()
    Image.new("L", (64, 64), 128).save(out, format="JPEG")
    data = bytearray(out.getvalue())
    pos = data.find(b"\xff\xc0")
    data[pos + 5 : pos + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def cases(root: Path, workdir: Path) -> dict[str, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    dicoms = sorted((root / "dicom").glob("*.dcm"))
    native = next(
        p
        for p in dicoms
        if "Implicit" in pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
    )
    j2k = j2k_dicom(native)
    made = {
        "deflate-bomb.dcm": deflate_bomb(random.Random(1), native.read_bytes()),
        "j2k-30000x30000-codestream.dcm": with_dimensions(j2k, "codestream-huge"),
        "j2k-max-codestream.dcm": with_dimensions(j2k, "codestream-max"),
        "jpeg-sof-60000x60000.jpg": jpeg_sof(),
        "png-bomb-30000.png": png_bomb(random.Random(3), b""),
        "rgba-59-megapixel.png": rgba_png(),
    }
    lossy12 = Path(pydicom.__file__).parent / "data" / "test_files" / "JPEG-lossy.dcm"
    paths = {name: workdir / name for name in made}
    for name, data in made.items():
        paths[name].write_bytes(data)
    if lossy12.is_file():
        paths["jpeg-extended-12-bit.dcm"] = lossy12
    for p in dicoms:
        paths[f"real:{p.name[:24]}"] = p
    return paths


def run_one(path: Path) -> dict[str, object]:
    """One `cxr-appliance process` in a child; its wall time, peak RSS and what it said."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "process", "--json", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=300)
    seconds = time.monotonic() - started
    # Called once per wrapper process (see main), so the children's maximum is this child's peak.
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = json.loads(out.splitlines()[-1]) if out.strip() else {}
    return {
        "seconds": round(seconds, 2),
        "peak_mb": round(peak_mb, 1),
        "status": result.get("status"),
        "reason": result.get("reason"),
        "traceback": "Traceback" in err,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=REPO / "artifacts" / "hostile.json")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cxr-hostile"))
    args = parser.parse_args(argv)
    paths = cases(data_dir(), args.workdir)
    report: dict[str, dict[str, object]] = {}
    for i, (name, path) in enumerate(paths.items(), 1):
        # Each case in a fresh grandchild: ru_maxrss of RUSAGE_CHILDREN is a running maximum, so a
        # wrapper process per case gives each its own figure.
        wrapper = subprocess.run(
            [sys.executable, "-m", "tools.quality.hostile_bench", "--one", str(path)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        report[name] = json.loads(wrapper.stdout.splitlines()[-1])
        r = report[name]
        print(
            f"[{i}/{len(paths)}] {name}: {r['status']} ({r['reason']}) {r['seconds']} s, {r['peak_mb']} MB",
            flush=True,
        )
    hostile = {k: v for k, v in report.items() if not k.startswith("real:")}
    failed = [
        k
        for k, v in hostile.items()
        if v["status"] == "ok" or float(str(v["seconds"])) > MAX_SECONDS or float(str(v["peak_mb"])) > MAX_MB
    ]
    summary = {"cases": report, "targets": {"seconds": MAX_SECONDS, "peak_mb": MAX_MB}, "failed": failed}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1))
    print(
        f"wrote {args.json}; {'all hostile files refused within the targets' if not failed else f'FAILED: {failed}'}"
    )
    return 1 if failed else 0


def one(path: Path) -> None:
    print(json.dumps(run_one(path)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        one(Path(sys.argv[2]))
    else:
        sys.exit(main())
