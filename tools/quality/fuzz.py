"""Fuzz `appliance.ingest.read_image` with seeded mutations of the real files in ../shared/data/cxr.

    python -m tools.quality.fuzz --cases 1000 --seed 7 --json artifacts/fuzz.json

Every case must end in a decoded image (finite float32 pixels in [0, 1]) or InputRejected with a reason;
anything else (another exception, a non-finite pixel, more memory than the pixel limit allows) is a
crash, listed with its case name so `--only NAME` reproduces it. Exit status 1 when there is a crash.
`--log FILE` appends one JSON line when a case starts and one with its outcome, so a case that kills
the process (a decoder library aborting) is still named: tools/quality/soak.py runs this in a child process and
resumes after such a case with `--start`. The seed corpus is the real DICOMs, PNGs and JPEGs, plus the native DX re-encoded (16-bit with a
window, RLE, JPEG 2000) so that every decoder the appliance ships is reached.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import json
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import JPEG2000Lossless, RLELossless

from appliance.errors import InputRejected
from appliance.ingest import read_image
from testsupport.mutate import Case, Mutator

REPO = Path(__file__).resolve().parents[2]
NATIVE_DX = "1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"
_SUFFIX = {"dicom": ".dcm", "png": ".png", "jpeg": ".jpg"}


@dataclass
class Outcome:
    name: str
    kind: str
    mutation: str
    status: str  # decoded | rejected | crash
    reason: str = ""
    detail: str = ""
    seconds: float = 0.0
    traced_peak_mb: float = 0.0


@dataclass
class FuzzReport:
    cases: int = 0
    decoded: int = 0
    rejected: int = 0
    crashes: list[Outcome] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    mutations: dict[str, int] = field(default_factory=dict)
    slowest_s: float = 0.0
    slowest_case: str = ""
    traced_peak_mb: float = 0.0
    rss_before_mb: float = 0.0
    rss_peak_mb: float = 0.0

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["crashes"] = [asdict(c) for c in self.crashes]
        return out


def data_dir() -> Path:
    import os

    return Path(os.environ.get("CXR_DATA", REPO.parent / "shared" / "data" / "cxr"))


def seed_corpus(root: Path, workdir: Path, rasters: int = 6) -> list[Path]:
    """Real DICOMs, the smallest real PNGs and JPEGs, and the native DX re-encoded three more ways."""
    workdir.mkdir(parents=True, exist_ok=True)
    dicoms = sorted((root / "dicom").glob("*.dcm"))
    images = sorted((root / "images").rglob("*.*"), key=lambda p: (p.stat().st_size, p.name))
    pngs = [p for p in images if p.suffix == ".png"][: rasters // 2]
    jpegs = [p for p in images if p.suffix == ".jpg"][: rasters // 2]
    return [*dicoms, *_derived_dicoms(root / "dicom" / NATIVE_DX, workdir), *pngs, *jpegs]


def _derived_dicoms(native: Path, workdir: Path) -> list[Path]:
    if not native.is_file():
        return []
    made = []
    ds = pydicom.dcmread(native)
    small = ds.pixel_array[::4, ::4].astype(np.uint16) * 16  # 256 x 256, 12 bits used of 16
    ds.Rows, ds.Columns = small.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.PixelData = small.tobytes()
    for label, syntax in (("explicit16", None), ("rle", RLELossless), ("j2k", JPEG2000Lossless)):
        copy = pydicom.dcmread(_saved(ds, workdir / "base16.dcm"))
        if syntax is not None:
            try:
                copy.compress(syntax)
            except Exception as exc:  # an encoder missing here: fuzz with what is available
                print(f"seed corpus: no {label} ({exc})", file=sys.stderr)
                continue
        made.append(_saved(copy, workdir / f"derived-{label}.dcm"))
    return made


def _saved(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_case(case: Case, path: Path, max_pixels: int, target_size: int | None) -> Outcome:
    """Run one case through read_image; classify it. Never raises (but for KeyboardInterrupt)."""
    path.write_bytes(case.data)
    outcome = Outcome(case.name, case.kind, case.mutation, "crash")
    tracemalloc.reset_peak()
    started = time.perf_counter()
    try:
        image = read_image(path, max_pixels=max_pixels, target_size=target_size)
    except InputRejected as exc:
        outcome.status, outcome.reason, outcome.detail = "rejected", exc.reason, exc.detail[:300]
        if not exc.reason or path.name not in exc.detail:
            outcome.status = "crash"  # a refusal must say why and name the file
            outcome.detail = f"reason {exc.reason!r} without the file name: {exc.detail[:200]}"
    except Exception as exc:  # exactly what the fuzzer is looking for
        outcome.reason, outcome.detail = type(exc).__name__, str(exc)[:300]
    else:
        pixels = image.pixels
        if pixels.ndim != 2 or pixels.dtype != np.float32 or pixels.size == 0:
            outcome.reason, outcome.detail = "bad output", f"{pixels.dtype} {pixels.shape}"
        elif not np.isfinite(pixels).all():
            outcome.reason, outcome.detail = "bad output", "non-finite pixels"
        elif float(pixels.min()) < 0 or float(pixels.max()) > 1:
            outcome.reason = "bad output"
            outcome.detail = f"pixels outside [0, 1]: {pixels.min()}..{pixels.max()}"
        else:
            outcome.status = "decoded"
    outcome.seconds = time.perf_counter() - started
    outcome.traced_peak_mb = tracemalloc.get_traced_memory()[1] / 1e6
    # Memory bound: the decoded frame (float32 plus its stored form) for max_pixels, with headroom.
    bound_mb = max_pixels * 16 / 1e6 + 64
    if outcome.status != "crash" and outcome.traced_peak_mb > bound_mb:
        outcome.status, outcome.reason = "crash", "memory"
        outcome.detail = f"{outcome.traced_peak_mb:.0f} MB traced > {bound_mb:.0f} MB bound"
    return outcome


def run_fuzz(
    cases: Iterable[Case],
    workdir: Path,
    *,
    max_pixels: int = 60_000_000,
    target_size: int | None = 256,
    progress: Callable[[Outcome], None] | None = None,
) -> FuzzReport:
    workdir.mkdir(parents=True, exist_ok=True)
    report = FuzzReport(rss_before_mb=rss_mb())
    reasons: collections.Counter[str] = collections.Counter()
    mutations: collections.Counter[str] = collections.Counter()
    started_tracing = not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    try:
        for case in cases:
            outcome = check_case(case, workdir / f"case{_SUFFIX[case.kind]}", max_pixels, target_size)
            report.cases += 1
            mutations[case.mutation.split("->")[0]] += 1
            if outcome.status == "decoded":
                report.decoded += 1
            elif outcome.status == "rejected":
                report.rejected += 1
                reasons[outcome.reason] += 1
            else:
                report.crashes.append(outcome)
            if outcome.seconds > report.slowest_s:
                report.slowest_s, report.slowest_case = outcome.seconds, case.name
            report.traced_peak_mb = max(report.traced_peak_mb, outcome.traced_peak_mb)
            if progress is not None:
                progress(outcome)
    finally:
        if started_tracing:
            tracemalloc.stop()
    report.reasons = dict(reasons.most_common())
    report.mutations = dict(sorted(mutations.items()))
    report.rss_peak_mb = rss_mb()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-pixels", type=int, default=60_000_000)
    parser.add_argument("--workdir", type=Path, default=REPO / "artifacts" / "fuzz")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--only", help="run only the case with this name (reproduce a crash)")
    parser.add_argument("--start", type=int, default=0, help="first case index (resume after a crash)")
    parser.add_argument("--log", type=Path, help="append JSON lines: each case's start and outcome")
    parser.add_argument("--hang-seconds", type=float, default=120.0, help="dump stacks and exit past this")
    args = parser.parse_args(argv)
    corpus = seed_corpus(data_dir(), args.workdir / "corpus")
    cases: Iterable[Case] = Mutator(args.seed).cases(corpus, args.cases, start=args.start)
    if args.only:
        cases = [c for c in cases if c.name == args.only]
    log = args.log.open("a", encoding="utf-8") if args.log else None

    def logged(stream: Iterable[Case]) -> Iterable[Case]:
        for case in stream:
            if log is not None:
                log.write(json.dumps({"start": case.name, "mutation": case.mutation}) + "\n")
                log.flush()
            yield case

    def progress(outcome: Outcome) -> None:
        faulthandler.dump_traceback_later(args.hang_seconds, exit=True)  # re-armed per case
        if log is not None:
            log.write(json.dumps(asdict(outcome)) + "\n")
            log.flush()
        if outcome.status == "crash":
            print(f"CRASH {outcome.name}: {outcome.reason}: {outcome.detail}", file=sys.stderr)

    faulthandler.dump_traceback_later(args.hang_seconds, exit=True)
    report = run_fuzz(logged(cases), args.workdir, max_pixels=args.max_pixels, progress=progress)
    faulthandler.cancel_dump_traceback_later()
    text = json.dumps(report.to_dict(), indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text, encoding="utf-8")
    summary = {k: v for k, v in report.to_dict().items() if k != "crashes"}
    print(json.dumps({**summary, "crashes": len(report.crashes)}, indent=1))
    return 1 if report.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
