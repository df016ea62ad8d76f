"""The DICOM outputs' own durable queue and worker: the processing loop never waits for an SR or SC.

Building the SR and SC takes 220-470 ms per image (inference: ~25 ms). The loop only files a job
(`submit`, a few ms) and goes on; the worker thread renders it. A job is two files in <outbox>/jobs/:

  <image_id>.source   the DICOM input, hard-linked (its header is copied into the SR/SC; the spool may
                      move or purge its own name meanwhile)
  <image_id>.job.npz  the result (JSON), the pixels as the reader decoded them for the model (float16:
                      far finer than the SC's 8 bits) and the full float heatmap with its label

The .npz is written last, atomically: a job exists once it is there, and a kill -9 at any point leaves
either no job (the loop analyses the image again: nothing was journaled yet) or a whole one, which the
worker renders after the restart. Rendering is idempotent: UIDs and file names follow the result's
message id, so a job run again (killed after writing, before its files were removed) rewrites the same
objects, which the PACS treats as one.

Failures, under the processor's one error rule (appliance/processor.py):
- a temporary problem (OSError: disk full, I/O error) is not the image's: the job waits and is tried
  again with backoff (RETRY_MIN_SECONDS doubling to RETRY_MAX_SECONDS), logged as a warning;
- DicomOutError (highdicom refused an object, the source lacks its UIDs) is final, as before: logged as
  an error, no DICOM outputs for that image, the job is dropped;
- any other exception, and the process dying while rendering a job (a <image_id>.running marker found at
  start), counts against the image through `count_failure` (the processor: the spool's failure count,
  logged with the reason). Under MAX_FAILURES the job is tried again after FAILED_RETRY_SECONDS; at the
  limit the image is quarantined with the reason and the job is parked in jobs/failed/ with a
  .reason.txt (deleted with the other unsent files after dicom_out.keep_unsent_days).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np

from appliance.dicomout import DicomJob, DicomOutError
from appliance.durable import fsync_dir, link_or_copy, write_atomically
from appliance.errors import ApplianceError
from appliance.result import Result
from appliance.retention import purge_older

log = logging.getLogger(__name__)

JOB_SUFFIX: Final = ".job.npz"
SOURCE_SUFFIX: Final = ".source"
RUNNING_SUFFIX: Final = ".running"
REASON_SUFFIX: Final = ".reason.txt"
RETRY_MIN_SECONDS: Final = 1.0
RETRY_MAX_SECONDS: Final = 60.0
FAILED_RETRY_SECONDS: Final = 1.0  # a counted failure: tried again soon, the count decides when to stop
IDLE_RESCAN_SECONDS: Final = 60.0

# (image_id, the input's name, what was raised) -> True when the image has failed too often: give up.
CountFailure = Callable[[str, str, BaseException], bool]


class DicomOutInterrupted(ApplianceError):
    """The process died while this job was being rendered (counted like an exception)."""


def _text(data: bytes | str) -> np.ndarray:
    return np.frombuffer(data.encode() if isinstance(data, str) else data, dtype=np.uint8)


def _str(array: np.ndarray) -> str:
    return array.tobytes().decode()


class DicomJobQueue:
    """Jobs on disk, oldest first; one worker thread renders them with `render`."""

    def __init__(self, folder: Path, render: Callable[[DicomJob], object]) -> None:
        self.folder = Path(folder)
        self.failed_dir = self.folder / "failed"  # both made when first needed: an idle outbox stays empty
        self.render = render
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._due: dict[str, float] = {}  # image_id -> when a job that failed is tried again
        self._count_failure: CountFailure | None = None

    # --- the loop's side ---------------------------------------------------------------------------

    def submit(self, job: DicomJob) -> None:
        """File the job durably (source link first, the .npz last). Does not wake the worker: `wake`
        once the result is handed to MQTT, so the ward still hears first."""
        image_id = job.result.image.image_id
        self.folder.mkdir(exist_ok=True)
        link_or_copy(job.source, self.folder / (image_id + SOURCE_SUFFIX))
        arrays: dict[str, Any] = {
            "result": _text(job.result.model_dump_json()),
            "name": _text(job.name),
            "pixels": np.asarray(job.pixels, dtype=np.float16),
        }
        if job.heat is not None:
            arrays["heat"] = np.asarray(job.heat, dtype=np.float32)
            arrays["heat_label"] = _text(job.heat_label or "")
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # uncompressed: compressing costs the loop more than the write
        write_atomically(self.folder / (image_id + JOB_SUFFIX), buffer.getvalue())

    def wake(self) -> None:
        self._wake.set()

    # --- the jobs on disk --------------------------------------------------------------------------

    def pending(self) -> list[str]:
        """Image ids of the waiting jobs, oldest first."""
        jobs = [p for p in self.folder.glob("*" + JOB_SUFFIX) if p.is_file()]
        jobs.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.name.removesuffix(JOB_SUFFIX) for p in jobs]

    def depth(self) -> int:
        return len(self.pending())

    def load(self, image_id: str) -> DicomJob:
        with np.load(self.folder / (image_id + JOB_SUFFIX), allow_pickle=False) as data:
            heat = data["heat"] if "heat" in data.files else None
            return DicomJob(
                result=Result.model_validate_json(data["result"].tobytes()),
                source=self.folder / (image_id + SOURCE_SUFFIX),
                name=_str(data["name"]),
                pixels=data["pixels"].astype(np.float32),
                heat=heat,
                heat_label=_str(data["heat_label"]) if heat is not None else None,
            )

    def _name(self, image_id: str) -> str:
        try:
            with np.load(self.folder / (image_id + JOB_SUFFIX), allow_pickle=False) as data:
                return _str(data["name"])
        except Exception:  # a damaged job still has an id to name it by
            return image_id[:12]

    def _files(self, image_id: str) -> list[Path]:
        """The job's files, the .npz first: removed in this order, a half-removed job is no job."""
        return [self.folder / (image_id + s) for s in (JOB_SUFFIX, SOURCE_SUFFIX, RUNNING_SUFFIX)]

    def _drop(self, image_id: str) -> None:
        for path in self._files(image_id):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        fsync_dir(self.folder)
        self._due.pop(image_id, None)

    def cancel(self, image_id: str) -> bool:
        """Forget a queued job (its image was refused after all): no SR/SC for a quarantined image. A
        render already under way finishes. False when no such job waits."""
        if not (self.folder / (image_id + JOB_SUFFIX)).exists():
            return False
        if (self.folder / (image_id + RUNNING_SUFFIX)).exists():
            return False  # the worker has it: removing its files under it would only turn into an error
        self._drop(image_id)
        log.info("DICOM outputs for %s cancelled: the image was refused", image_id[:12])
        return True

    def _park(self, image_id: str, name: str, reason: str) -> None:
        """Keep a job given up on in failed/, with why: a person can move it back to jobs/."""
        self.failed_dir.mkdir(exist_ok=True)
        for path in self._files(image_id)[:2]:
            with contextlib.suppress(FileNotFoundError):
                shutil.move(path, self.failed_dir / path.name)
        write_atomically(self.failed_dir / (image_id + REASON_SUFFIX), f"{name}: {reason}\n".encode())
        self._drop(image_id)
        log.error("DICOM outputs for %s given up; the job is kept in %s", name, self.failed_dir)

    # --- the worker --------------------------------------------------------------------------------

    def start(self, count_failure: CountFailure) -> DicomJobQueue:
        self._count_failure = count_failure
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dicom-out", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """After the job being rendered (if any); the others wait on disk for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        for marker in sorted(self.folder.glob("*" + RUNNING_SUFFIX)):
            image_id = marker.name.removesuffix(RUNNING_SUFFIX)
            if image_id not in self.pending():  # killed while removing a finished job
                marker.unlink(missing_ok=True)
                continue
            interrupted = DicomOutInterrupted("the appliance stopped while writing the DICOM outputs")
            self._failed(image_id, self._name(image_id), interrupted)
        delay = RETRY_MIN_SECONDS
        while not self._stop.is_set():
            self._wake.clear()
            now = time.time()
            due = [i for i in self.pending() if self._due.get(i, 0.0) <= now]
            if not due:
                waits = [t - now for t in self._due.values()]
                self._wake.wait(min([IDLE_RESCAN_SECONDS, *waits]))
                continue
            try:
                self.run_one(due[0])
            except OSError as exc:  # not the image's fault: wait, the job stays
                log.warning(
                    "DICOM outputs: %s: %s; %d job(s) wait, next try in %.0f s",
                    exc.filename or "",
                    exc.strerror or exc,
                    self.depth(),
                    delay,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            except Exception:  # a bug here must not end the thread: the jobs are on disk
                log.exception("DICOM outputs: unexpected error in the worker; retrying in %.0f s", delay)
                self._stop.wait(delay)
                continue
            delay = RETRY_MIN_SECONDS

    def run_one(self, image_id: str) -> None:
        """Render one job and remove it. Raises OSError (temporary: the job stays); anything else is
        counted against the image."""
        marker = self.folder / (image_id + RUNNING_SUFFIX)
        write_atomically(marker, b"")
        name = image_id[:12]
        try:
            job = self.load(image_id)
            name = job.name
            self.render(job)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
            raise
        except DicomOutError as exc:  # final, as it always was: said once, no DICOM outputs
            log.error("no DICOM results for %s: %s", image_id[:12], exc)
        except Exception as exc:
            self._failed(image_id, name, exc)
            return
        self._drop(image_id)

    def _failed(self, image_id: str, name: str, exc: BaseException) -> None:
        assert self._count_failure is not None
        with contextlib.suppress(FileNotFoundError):
            (self.folder / (image_id + RUNNING_SUFFIX)).unlink()
        if self._count_failure(image_id, name, exc):
            self._park(image_id, name, f"{type(exc).__name__}: {exc}")
        else:
            self._due[image_id] = time.time() + FAILED_RETRY_SECONDS

    def purge_failed(self, older_than_s: float) -> list[Path]:
        return purge_older(self.failed_dir, older_than_s)
