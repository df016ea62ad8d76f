"""For each result of a DICOM input: build the SR and the SC, write them to the outbox, queue them.

The processing loop only files a DicomJob (`submit`); the worker of appliance/dicomout/queue.py builds
and writes the objects in the background, behind that durable queue, so the ward never waits for them.

Files are written atomically as <outbox>/<image_id>.sr.dcm and <image_id>.sc.dcm; with a PACS
configured they are also hard-linked into <outbox>/queue/ for the sender. Writing the same result
again (the daemon re-hands a result after a crash) rewrites the same names with the same UIDs.

The source's header is checked before it is copied: a Patient's Age that is not a DICOM age is
repaired where that is unambiguous ("45Y", "045y ") and left out otherwise ("45": years? months?).
What highdicom and pydicom say through Python warnings (a one-part patient name, say) is logged here,
naming the image, instead of going raw to stderr.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from appliance.config import AppConfig, DicomOutConfig
from appliance.dicomnet.sender import DicomSender
from appliance.dicomout import DicomJob, DicomOutError
from appliance.dicomout.queue import JOB_SUFFIX, CountFailure, DicomJobQueue
from appliance.dicomout.sc import build_sc
from appliance.dicomout.sr import build_sr
from appliance.durable import write_atomically
from appliance.errors import UserError
from appliance.result import Result
from appliance.retention import purge_older

log = logging.getLogger(__name__)

# What the SR/SC copy or reference from the source; highdicom needs them present.
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# Type 2 patient/study attributes (present, may be empty) that highdicom copies; some exports omit them.
TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
# Patient's Age as written by units and exports: up to three digits and a unit, in any case and spacing.
_AGE = re.compile(r"0*(\d{1,3})\s*([DWMY])")


def repaired_age(value: object) -> str | None:
    """A valid Patient's Age (AS: three digits and D, W, M or Y) for `value`, or None when it has no unit
    or is not an age at all."""
    match = _AGE.fullmatch(str(value).strip().upper()) if isinstance(value, str) else None
    return f"{match[1].zfill(3)}{match[2]}" if match else None


_DATE = re.compile(r"(\d{4})[-./]?(\d{2})[-./]?(\d{2})")


def check_dates(source: Dataset, name: str) -> None:
    """Repair or empty the source's dates the SR copies (DA: YYYYMMDD). A birth date written 1950-01-01
    made highdicom refuse the whole SR. The values are not logged: they are the patient's."""
    for key, what in (("PatientBirthDate", "Patient's Birth Date"), ("StudyDate", "Study Date")):
        value = str(source.get(key, "") or "").strip()
        if not value or re.fullmatch(r"\d{8}", value):
            continue
        match = _DATE.fullmatch(value)
        setattr(source, key, "".join(match.groups()) if match else "")
        log.info(
            "%s: %s is not a DICOM date (YYYYMMDD); %s", name, what, "repaired" if match else "left empty"
        )


def check_patient_age(source: Dataset, name: str) -> None:
    """Repair or drop the source's Patient's Age (highdicom copies it into the SR as it is)."""
    if "PatientAge" not in source or source.PatientAge in (None, ""):
        return
    age = repaired_age(source.PatientAge)
    if age is None:
        del source.PatientAge
        log.info("%s: Patient's Age is not a DICOM age (nnnD/W/M/Y); left out of the DICOM results", name)
    elif age != source.PatientAge:
        source.PatientAge = age
        log.info("%s: Patient's Age repaired to the DICOM form %s", name, age)


@contextlib.contextmanager
def warnings_logged(image_id: str) -> Iterator[None]:
    """Log the Python warnings of the block (each text once) instead of printing them to stderr.

    warnings.catch_warnings swaps process-wide state, so a warning another thread (the processing loop)
    raises meanwhile is logged here too (harmless: it is logged, not lost); the daemon writes DICOM
    results one at a time, on the worker of its DICOM job queue."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            # The text may quote the patient's data (highdicom: 'The string "DOE JOHN" is unlikely to
            # represent the intended person name') or another thread's file: only at debug level.
            for text, kind in dict.fromkeys((str(w.message), w.category.__name__) for w in caught):
                log.info("DICOM results for %s: a %s (its text at debug level)", image_id[:12], kind)
                log.debug("DICOM results for %s: %s", image_id[:12], text)


def wanted(result: Result) -> bool:
    """DICOM results are made for finished DICOM inputs only (not for refused or errored images)."""
    return result.image.format == "dicom" and result.status == "ok"


class DicomOutWriter:
    def __init__(self, config: DicomOutConfig, sender: DicomSender | None = None) -> None:
        self.config = config
        self.sender = sender
        try:
            config.outbox.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"dicom_out.outbox {config.outbox}: cannot create: {exc.strerror}") from exc
        self.jobs = DicomJobQueue(config.outbox / "jobs", self.write)

    @classmethod
    def from_config(cls, config: AppConfig) -> DicomOutWriter:
        return cls(config.dicom_out, DicomSender.from_config(config))

    def start(self) -> DicomOutWriter:
        if self.sender is not None:
            self.sender.start()
        return self

    def start_worker(self, count_failure: CountFailure) -> DicomOutWriter:
        """Render the queued jobs in the background; `count_failure` applies the error rule."""
        self.jobs.start(count_failure)
        return self

    def submit(self, job: DicomJob) -> bool:
        """File a job for the worker (durable when this returns); False when none is wanted."""
        if not wanted(job.result):
            return False
        self.jobs.submit(job)
        return True

    def wake(self) -> None:
        self.jobs.wake()

    def cancel(self, image_id: str) -> bool:
        return self.jobs.cancel(image_id)

    def close(self) -> None:
        self.jobs.stop()  # first: its last job may still queue files for the sender
        if self.sender is not None:
            self.sender.stop()

    def purge(self) -> int:
        """Retention: written files go after dicom_out.keep_days unless the PACS has not taken them yet
        (queue/, failed/); those go only after keep_unsent_days, with an error. Returns how many."""
        outbox = self.config.outbox
        queue, failed = outbox / "queue", outbox / "failed"

        def unsent(path: Path) -> bool:
            return (queue / path.name).exists() or (failed / path.name).exists()

        removed = purge_older(outbox, self.config.keep_days * 86400, keep=unsent)
        limit = self.config.keep_unsent_days * 86400
        dropped = [*purge_older(queue, limit), *purge_older(failed, limit), *self.jobs.purge_failed(limit)]
        for path in dropped:
            if path.name.endswith((".dcm", JOB_SUFFIX)):
                log.error(
                    "DICOM result %s deleted unsent after %g days (dicom_out.keep_unsent_days)",
                    path.name,
                    self.config.keep_unsent_days,
                )
        return len(removed) + len(dropped)

    def write(self, job: DicomJob) -> list[Path]:
        """SR (+ SC) for a finished DICOM result; [] for other inputs and for refused/errored images.

        Raises DicomOutError when the source cannot be read or highdicom refuses an object."""
        result = job.result
        if not wanted(result):
            return []
        started = time.perf_counter()
        with warnings_logged(result.image.image_id):
            written = self._write(job)
        if self.sender is not None:
            for path in written:
                self.sender.enqueue(path)
        log.info(
            "DICOM results for %s: %s (%.0f ms)%s",
            result.image.image_id[:12],
            ", ".join(p.name for p in written),
            (time.perf_counter() - started) * 1000,
            "; queued for the PACS" if self.sender is not None else "",
        )
        return written

    def write_safely(self, job: DicomJob) -> list[Path]:
        """write(), but a failure is logged and never raised (a one-off write outside the queue)."""
        image_id = job.result.image.image_id[:12]
        try:
            return self.write(job)
        except DicomOutError as exc:
            log.error("no DICOM results for %s: %s", image_id, exc)
        except OSError as exc:
            log.error("no DICOM results for %s: %s: %s", image_id, exc.filename, exc.strerror)
        return []

    def _write(self, job: DicomJob) -> list[Path]:
        result, source_path = job.result, job.source
        try:
            source = pydicom.dcmread(source_path, stop_before_pixels=True)
        except (OSError, InvalidDicomError) as exc:
            raise DicomOutError(f"{job.name}: cannot read the source DICOM: {exc}") from exc
        missing = [key for key in REQUIRED if not str(source.get(key, "") or "").strip()]
        if missing:
            raise DicomOutError(f"{job.name}: the source DICOM lacks {', '.join(missing)}")
        for key in TYPE2:
            if key not in source:
                setattr(source, key, "")
        check_patient_age(source, job.name)
        check_dates(source, job.name)
        manufacturer = self.config.manufacturer
        objects: list[tuple[str, Dataset]] = [("sr", build_sr(result, source, manufacturer=manufacturer))]
        if self.config.secondary_capture:
            objects.append(("sc", build_sc(job, source, manufacturer=manufacturer)))
        return [self._save(ds, f"{result.image.image_id}.{kind}.dcm") for kind, ds in objects]

    def _save(self, ds: Dataset, name: str) -> Path:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return write_atomically(self.config.outbox / name, buffer.getvalue())
