"""The early read: on an idle cart an uncompressed DICOM is decoded while the intake hashes it, and the loop
takes that decode only for the very file it claimed; compressed files, a busy cart, a changed file, a
refused or duplicate file and another model all leave the loop to read the file itself."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance import pipeline
from appliance.early_read import EarlyRead, transfer_syntax
from appliance.feeder import Feeder
from appliance.ingest.intake import FOLDER, Intake, Verdict
from appliance.ingest.spool import Spool
from appliance.pipeline import Analyzer, Job
from tests.ingest.conftest import JPEG_BASELINE, NATIVE_DX, real


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every decode the Analyzer starts, in order."""
    seen: list[str] = []
    decode = pipeline.read_image

    def counted(path: Path, **kw: object) -> object:
        seen.append(str(path))
        return decode(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "read_image", counted)
    return seen


def arrive(tmp_path: Path, name: str, as_name: str = "scan.dcm") -> Path:
    watch = tmp_path / "watch"
    watch.mkdir(exist_ok=True)
    return Path(shutil.copyfile(real(name), watch / as_name))


def setup(spool: Spool, analyzer: Analyzer, *, idle: bool = True) -> tuple[EarlyRead, Intake, Feeder]:
    early = EarlyRead(lambda: analyzer)
    early.idle = idle
    return early, Intake(spool, early_read=early), Feeder(spool, batch=2, early_read=early)


def test_the_transfer_syntax_is_read_from_the_file_meta_and_nothing_else_is_guessed() -> None:
    assert transfer_syntax(real(NATIVE_DX).read_bytes()[:4096]) == "1.2.840.10008.1.2"
    assert transfer_syntax(real(JPEG_BASELINE).read_bytes()[:4096]) == "1.2.840.10008.1.2.4.50"
    head = real(NATIVE_DX).read_bytes()[:4096]
    assert transfer_syntax(head[:140]) is None  # cut inside the File Meta
    assert transfer_syntax(b"\0" * 128 + b"DICM" + b"\x08\x00\x05\x00CS\x02\x00IR") is None  # no group 2
    assert transfer_syntax(b"\x89PNG" + b"\0" * 200) is None


def test_an_idle_cart_decodes_an_uncompressed_dicom_once_while_it_is_hashed(
    spool: Spool, analyzer: Analyzer, tmp_path: Path, decodes: list[str]
) -> None:
    _, intake, feeder = setup(spool, analyzer)
    src = arrive(tmp_path, NATIVE_DX)
    outcome = intake.offer(src, "inbox", FOLDER)
    assert outcome.verdict is Verdict.ACCEPTED
    (job,) = feeder.take(analyzer)
    assert job.image_id == outcome.image_id and job.image is not None and job.tensor is not None
    assert decodes == [decodes[0]] and decodes[0].startswith("/proc/self/fd/")  # read once, early
    assert {"read", "preprocess"} <= set(job.timer.stages)  # its timings came with it
    again = Job(path=job.path, image_id="", source="")
    analyzer.read(again)
    assert again.image is not None and again.tensor is not None
    np.testing.assert_array_equal(job.image.pixels, again.image.pixels)
    np.testing.assert_array_equal(job.tensor, again.tensor)
    assert job.image.meta == again.image.meta


def test_a_busy_cart_or_a_compressed_dicom_is_read_by_the_loop_as_always(
    spool: Spool, analyzer: Analyzer, tmp_path: Path, decodes: list[str]
) -> None:
    early, intake, feeder = setup(spool, analyzer, idle=False)
    assert intake.offer(arrive(tmp_path, NATIVE_DX), "inbox", FOLDER).verdict is Verdict.ACCEPTED
    (job,) = feeder.take(analyzer)
    assert decodes == [str(job.path)]  # not idle: nothing started early
    spool.mark_done(job.image_id)
    assert feeder.take(analyzer) == [] and early.idle  # the loop found nothing: idle from now
    decodes.clear()
    assert intake.offer(arrive(tmp_path, JPEG_BASELINE, "b.dcm"), "inbox", FOLDER).verdict is Verdict.ACCEPTED
    (job,) = feeder.take(analyzer)
    assert job.image is not None and decodes == [str(job.path)]  # JPEG: never decoded before acceptance


def test_a_file_changed_after_its_early_read_is_read_again(
    spool: Spool, analyzer: Analyzer, tmp_path: Path, decodes: list[str]
) -> None:
    early, _, feeder = setup(spool, analyzer)
    src = arrive(tmp_path, NATIVE_DX)
    early.begin(src)
    got = spool.accept(src, "inbox")
    stat = got.path.stat()  # type: ignore[union-attr]
    os.utime(got.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # type: ignore[union-attr]
    (job,) = feeder.take(analyzer)
    assert len(decodes) == 2 and decodes[1] == str(job.path) and job.image is not None


def test_a_duplicate_drops_its_early_read(
    spool: Spool, analyzer: Analyzer, tmp_path: Path, decodes: list[str]
) -> None:
    early, intake, feeder = setup(spool, analyzer)
    assert intake.offer(arrive(tmp_path, NATIVE_DX), "inbox", FOLDER).verdict is Verdict.ACCEPTED
    (first,) = feeder.take(analyzer)
    spool.mark_done(first.image_id)
    assert feeder.take(analyzer) == [] and early.idle
    assert (
        intake.offer(arrive(tmp_path, NATIVE_DX, "again.dcm"), "inbox", FOLDER).verdict is Verdict.DUPLICATE
    )
    assert early._pending is None  # dropped at once, not held until the next claim


def test_a_read_made_for_the_model_before_a_reload_is_not_taken(
    spool: Spool, analyzer: Analyzer, tmp_path: Path, decodes: list[str]
) -> None:
    current = [analyzer]
    early = EarlyRead(lambda: current[0])
    early.idle = True
    intake, feeder = Intake(spool, early_read=early), Feeder(spool, batch=2, early_read=early)
    assert intake.offer(arrive(tmp_path, NATIVE_DX), "inbox", FOLDER).verdict is Verdict.ACCEPTED
    current[0] = reloaded = Analyzer(analyzer.config, analyzer.manifest, analyzer.backend)
    (job,) = feeder.take(reloaded)
    assert decodes[0].startswith("/proc/self/fd/") and decodes[1:] == [str(job.path)]
    assert job.image is not None
