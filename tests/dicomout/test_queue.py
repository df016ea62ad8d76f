"""The DICOM outputs' durable queue and worker: jobs survive a restart, are idempotent, and failures
count against the image under the processor's error rule."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from appliance.config import DicomOutConfig
from appliance.dicomout.queue import JOB_SUFFIX, REASON_SUFFIX, RUNNING_SUFFIX, DicomOutInterrupted
from appliance.dicomout.writer import DicomOutWriter
from appliance.result import Result
from tests.dicomout.conftest import MakeJob
from testsupport.daemon import wait_until


class Counter:
    """The processor's side of the error rule: gives up at the third failure of an image."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, BaseException]] = []

    def __call__(self, image_id: str, name: str, exc: BaseException) -> bool:
        self.seen.append((image_id, name, exc))
        return sum(1 for i, _, _ in self.seen if i == image_id) >= 3


def config_outbox_dcm(writer: DicomOutWriter) -> list[Path]:
    return sorted(writer.config.outbox.glob("*.dcm"))


def test_a_filed_job_survives_a_restart_and_gives_the_same_objects_again(
    dicom_job: MakeJob, analyzed: list[tuple[Result, Path]], tmp_path: Path
) -> None:
    result, source_path = analyzed[0]
    config = DicomOutConfig(enabled=True, outbox=tmp_path / "dicom-out")
    spooled = tmp_path / "processing" / "x.dcm"  # the spool moves or purges its own name afterwards
    spooled.parent.mkdir()
    spooled.write_bytes(source_path.read_bytes())
    assert DicomOutWriter(config).submit(dicom_job(result, spooled))  # the process dies here: no worker
    spooled.unlink()
    writer, counter = DicomOutWriter(config), Counter()
    assert writer.jobs.depth() == 1
    writer.start_worker(counter)
    try:
        assert wait_until(lambda: writer.jobs.depth() == 0, 20, step=0.05)
    finally:
        writer.close()
    names = sorted(p.name for p in config.outbox.glob("*.dcm"))
    image_id = result.image.image_id
    assert names == [f"{image_id}.sc.dcm", f"{image_id}.sr.dcm"] and counter.seen == []
    assert list((config.outbox / "jobs").iterdir()) == []  # the job, its source link and marker: gone
    first = {p.name: pydicom.dcmread(p).SOPInstanceUID for p in config.outbox.glob("*.dcm")}
    # Killed after writing, before the job was removed: run again, the same instances.
    writer.jobs.submit(dicom_job(result, source_path))
    writer.jobs.run_one(image_id)
    assert {p.name: pydicom.dcmread(p).SOPInstanceUID for p in config.outbox.glob("*.dcm")} == first


def test_the_sc_is_drawn_from_the_full_heatmap_not_the_mqtt_png(
    dicom_job: MakeJob, analyzed: list[tuple[Result, Path]], tmp_path: Path
) -> None:
    result, source_path = analyzed[0]
    writer = DicomOutWriter(DicomOutConfig(enabled=True, outbox=tmp_path / "dicom-out"))

    def colour(job_result: Result, heat: bool) -> float:
        job = dicom_job(job_result, source_path)
        if not heat:
            job = type(job)(job.result, job.source, job.name, job.pixels)
        sc = next(p for p in writer.write(job) if p.name.endswith(".sc.dcm"))
        rgb = pydicom.dcmread(sc).pixel_array.astype(np.int16)
        h, w = rgb.shape[:2]  # where HEAT peaks (the burned-in label is yellow too: not there)
        return float(
            (rgb[..., 0] - rgb[..., 2])[int(h * 0.45) : int(h * 0.5), int(w * 0.26) : int(w * 0.3)].mean()
        )

    no_png = result.model_copy(update={"heatmap": None})  # mqtt.publish_heatmap: false
    assert colour(no_png, heat=True) > 60  # the heatmap is drawn all the same
    assert colour(result, heat=False) < 10  # a PNG in the payload alone draws nothing


def test_a_failing_job_is_retried_counted_and_parked_at_the_limit(
    dicom_job: MakeJob, analyzed: list[tuple[Result, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, source_path = analyzed[1]
    writer, counter = DicomOutWriter(DicomOutConfig(enabled=True, outbox=tmp_path / "dicom-out")), Counter()
    monkeypatch.setattr("appliance.dicomout.queue.FAILED_RETRY_SECONDS", 0.05)

    def broken(job: object) -> None:
        raise KeyError("1.2.826.0.1.3680043.10.1.999.1")

    writer.jobs.render = broken
    assert writer.submit(dicom_job(result, source_path))
    writer.wake()
    writer.start_worker(counter)
    try:
        assert wait_until(lambda: writer.jobs.depth() == 0, 20, step=0.05)
    finally:
        writer.close()
    image_id = result.image.image_id
    assert [(i, n, type(e)) for i, n, e in counter.seen] == [(image_id, source_path.name, KeyError)] * 3
    failed = writer.jobs.failed_dir
    assert (failed / (image_id + JOB_SUFFIX)).is_file()
    assert "KeyError" in (failed / (image_id + REASON_SUFFIX)).read_text()
    assert config_outbox_dcm(writer) == []


def test_the_process_dying_while_rendering_counts_once_and_the_job_runs_again(
    dicom_job: MakeJob, analyzed: list[tuple[Result, Path]], tmp_path: Path
) -> None:
    result, source_path = analyzed[2]
    config = DicomOutConfig(enabled=True, outbox=tmp_path / "dicom-out")
    writer = DicomOutWriter(config)
    writer.submit(dicom_job(result, source_path))
    image_id = result.image.image_id
    (writer.jobs.folder / (image_id + RUNNING_SUFFIX)).write_bytes(b"")  # killed mid-render
    counter = Counter()
    writer.start_worker(counter)
    try:
        assert wait_until(lambda: writer.jobs.depth() == 0, 20, step=0.05)
    finally:
        writer.close()
    assert [(i, type(e)) for i, _, e in counter.seen] == [(image_id, DicomOutInterrupted)]
    assert len(config_outbox_dcm(writer)) == 2


def test_a_cancelled_job_writes_nothing(
    dicom_job: MakeJob, analyzed: list[tuple[Result, Path]], tmp_path: Path
) -> None:
    """An image refused after its job was filed (its MQTT hand-off kept failing) gets no SR/SC."""
    result, source_path = analyzed[0]
    config = DicomOutConfig(enabled=True, outbox=tmp_path / "dicom-out")
    writer = DicomOutWriter(config)
    assert writer.submit(dicom_job(result, source_path))
    assert writer.cancel(result.image.image_id) and writer.jobs.depth() == 0
    assert not writer.cancel(result.image.image_id)  # nothing left to cancel
    writer.start_worker(Counter())
    try:
        time.sleep(1.0)  # the worker had its chance
    finally:
        writer.close()
    assert config_outbox_dcm(writer) == []
    assert list(config.outbox.glob("jobs/*")) == []
