"""The processor: one image's life from the spool to done/ or quarantine/, under one error rule.

claim (the daemon's loop) -> analyse -> enrich with the patient's priors -> DICOM job -> journal ->
outputs (MQTT result and thumbnail) -> done/. Order matters for "nothing lost, nothing twice": the
DICOM job is filed in its durable queue first (it needs the analysis in memory: the decoded pixels and
the full heatmap); then the journal row, the outbox messages and the spool state are written in ONE
transaction of the appliance's store (one fsync), and the file moves to done/ after it commits. After a
kill -9 before that commit the spool hands the image back and it is analysed again (its DICOM job filed
again under the same name); after it, the row says done and the spool's recovery only finishes the move.
An image whose journal row exists but whose hand-off did not finish (an older version wrote them apart)
is recognised by the journal and handed off again under the same message id (the outbox ignores an id
it already holds or sent). The SR and SC are rendered by the worker of that queue
(appliance/dicomout/queue.py), in the background: the loop does not wait 220-470 ms per image for them.

The error rule, the same on every path: a temporary problem (storage that cannot be written, a backend
that is down) is raised to the loop, which keeps the images and marks the cart degraded; any other
exception counts against the one image it happened on, which is tried again until MAX_FAILURES and
then quarantined with the reason. The process dying while an image is in processing/ counts the same
way (the spool's recovery counts it). The DICOM worker applies the same rule after the image is done:
an exception while rendering its SR/SC (or the process dying meanwhile) counts against the image
(`_dicom_failed`, logged as "DICOM hand-off: ..."), the job is tried again, and at MAX_FAILURES the image
goes from done/ to quarantine/ with the reason (its MQTT result, already sent, stands) and the job is
kept in the queue's failed/. A temporary problem there (disk full) waits, uncounted.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from appliance.dicomout import DicomJob
from appliance.errors import BackendUnavailable
from appliance.ingest.spool import Spool
from appliance.ingest.spool_records import SPOOL_ERRORS
from appliance.interpret import thumbnail
from appliance.interpret.decisions import UrgentPoints
from appliance.interpret.priors import with_priors
from appliance.journal import Journal
from appliance.logs import printable
from appliance.pipeline import Analyzer, Job
from appliance.publish.mqtt import MqttPublisher
from appliance.result import Result
from appliance.store import Store

if TYPE_CHECKING:  # the writer (highdicom) is loaded only on carts with DICOM outputs
    from appliance.dicomout.writer import DicomOutWriter

log = logging.getLogger("appliance.processor")

# An image that failed this many times (the process died reading it, or a stage raised) is refused
# instead of retried: a decoder that segfaults, a library bug on one odd file.
MAX_FAILURES = 3
# Storage that cannot be written (disk full, I/O error) or a backend that is down (a restarting Triton,
# GPU out of memory): not the image's fault, so the images wait and the cart says it is degraded.
TEMPORARY = (*SPOOL_ERRORS, BackendUnavailable)

# Told about every image that ended: (job, result, analysed). analysed is False for a refusal after
# MAX_FAILURES (no reading to learn from, e.g. for the drift watch).
Finished = Callable[[Job, Result, bool], None]


class ImageProcessor:
    def __init__(
        self,
        store: Store,
        spool: Spool,
        journal: Journal,
        analyzer: Analyzer,
        *,
        publisher: MqttPublisher | None,
        dicom_out: DicomOutWriter | None,
        on_finished: Finished,
        log_skipped_thumbnails: bool = True,
    ) -> None:
        self.store = store  # the spool's, journal's and outbox's: one image's end is one transaction
        self.spool = spool
        self.journal = journal
        self.analyzer = analyzer  # replaced by the daemon when a reload brings another model
        self.publisher = publisher
        self.dicom_out = dicom_out
        self.on_finished = on_finished
        self.log_skipped_thumbnails = log_skipped_thumbnails
        self.processed = 0
        if dicom_out is not None:
            dicom_out.start_worker(self._dicom_failed)

    def process(self, jobs: list[Job]) -> None:
        fresh = []
        for job in jobs:
            if self.spool.crashes(job.image_id) >= MAX_FAILURES:
                self._give_up(job)
                continue
            with self._counted(job, "hand-off"):
                earlier = self._journaled(job)
                if earlier is not None:  # crashed after the journal write: finish the hand-off only
                    self._hand_off(job, earlier)
                else:
                    fresh.append(job)
        # A temporary problem is no image's fault: the loop keeps the batch and retries.
        for job, outcome in self.analyzer.analyze_each(fresh, reraise=TEMPORARY):
            if isinstance(outcome, Result):
                with self._counted(job, "journal/hand-off"):
                    self._finish(job, outcome)
            else:
                self._count_failure(job, "analysis", outcome)

    def _journaled(self, job: Job) -> Result | None:
        try:
            return self.journal.result_for(job.image_id)
        except ValueError:  # a row written by an older payload version: analyse the image again
            log.exception("%s: stored result unreadable; analysing again", job.path.name)
            return None

    @contextlib.contextmanager
    def _counted(self, job: Job, stage: str) -> Iterator[None]:
        try:
            yield
        except TEMPORARY:
            raise
        except Exception as exc:
            self._count_failure(job, stage, exc)

    def _counted_failure(self, image_id: str, name: str, stage: str, exc: BaseException) -> int:
        """Log why and count it against the image; returns its failures so far."""
        detail = printable(f"{stage}: {type(exc).__name__}: {exc}")[:300]
        log.error("%s: %s", name, detail, exc_info=exc)
        count = self.spool.record_failure(image_id, detail)
        if count < MAX_FAILURES:
            log.warning("%s: failed %d of %d times; tried again", name, count, MAX_FAILURES)
        return count

    def _count_failure(self, job: Job, stage: str, exc: BaseException) -> None:
        if self._counted_failure(job.image_id, job.path.name, stage, exc) >= MAX_FAILURES:
            self._give_up(job)

    def _dicom_failed(self, image_id: str, name: str, exc: BaseException) -> bool:
        """The DICOM worker's failures (its thread; the spool locks): True when it should give up.

        The image's MQTT result was sent and its journal row stays; at the limit only the file moves to
        quarantine/ with the reason (an error result under the same message id would not be sent)."""
        if self._counted_failure(image_id, name, "DICOM hand-off", exc) < MAX_FAILURES:
            return False
        self.spool.quarantine(image_id, *self._refusal(image_id, name))
        return True

    def _refusal(self, image_id: str, name: str) -> tuple[str, str]:
        """Reason and detail for an image refused at MAX_FAILURES, from the last failure recorded."""
        last = self.spool.last_failure(image_id)
        if last is None:  # every failure was the process dying while it read this image
            return "crashed the reader", f"the appliance stopped {MAX_FAILURES} times while reading {name}"
        return "internal error", f"failed {MAX_FAILURES} times; last: {last}"

    def _give_up(self, job: Job) -> None:
        """The image failed MAX_FAILURES times: the ward is told, the file goes to quarantine with why.
        Its journal row (if any) stays: it is the record of what was read before the failure."""
        reason, detail = self._refusal(job.image_id, job.path.name)
        result = self.analyzer.failed(job, reason, detail)
        if self.dicom_out is not None:  # a job filed on an earlier try: no SR/SC for a refused image
            self.dicom_out.cancel(job.image_id)
        with self.store.transaction():
            try:
                self.journal.record_result(result)
                if self.publisher is not None:
                    self.publisher.publish_result(result)
                    self.publisher.publish_thumbnail(result, None)  # the bed's picture is not this reading's
            except TEMPORARY:
                raise
            except Exception:  # the error result cannot be sent: the quarantine reason still says why
                log.exception("%s: could not report the refusal", job.path.name)
            self.spool.quarantine(job.image_id, reason, detail)
        self.on_finished(job, result, False)

    def _finish(self, job: Job, result: Result) -> None:
        """Journal first, then the outbox, then the spool: each step repeatable after a crash."""
        started = time.perf_counter()
        manifest = self.analyzer.manifest
        result = with_priors(result, self.journal, manifest.sequence_risk, UrgentPoints.of(manifest.triage))
        queued = self._file_dicom_job(job, result)
        # Journal row, outbox messages, spool state: one commit; the sender is woken before it is on disk.
        with self.store.transaction(wake_first=True):
            self.journal.record_result(result)
            result.timings_ms["journal"] = round((time.perf_counter() - started - queued) * 1000.0, 2)
            self._hand_off(job, result)
        self.processed += 1
        self.on_finished(job, result, True)
        log.info(
            "%s %s %s",
            job.path.name,
            result.status,
            result.triage or result.reason or "",
            extra={
                "fields": {"image_id": job.image_id[:12], "location": result.location, **result.timings_ms}
            },
        )

    def _file_dicom_job(self, job: Job, result: Result) -> float:
        """File the SR/SC job with the analysis it is rendered from; returns the seconds it took."""
        if self.dicom_out is None or job.image is None or job.reading is None:
            return 0.0
        started = time.perf_counter()
        filed = self.dicom_out.submit(
            DicomJob(
                result=result,
                source=job.path,
                name=job.path.name,
                pixels=job.image.pixels,
                heat=job.reading.heat,
                heat_label=job.reading.heat_label,
            )
        )
        seconds = time.perf_counter() - started
        if filed:
            result.timings_ms["dicom_queue"] = round(seconds * 1000.0, 2)
        return seconds

    def _publish_thumbnail(self, job: Job, result: Result) -> None:
        assert self.publisher is not None
        reading = job.reading  # None after a crash (the result came from the journal): no picture
        image = reading.thumbnail if reading is not None else None
        if reading is not None and reading.thumbnail_skipped and self.log_skipped_thumbnails:
            log.info("%s: no thumbnail: %s", job.path.name, reading.thumbnail_skipped)
        self.publisher.publish_thumbnail(result, thumbnail.payload(result, image) if image else None)

    def _hand_off(self, job: Job, result: Result) -> None:
        if self.publisher is not None:
            self.publisher.publish_result(result)
            self._publish_thumbnail(job, result)
        if self.dicom_out is not None:  # after publishing: the ward hears first, the PACS second
            self.store.after_commit(self.dicom_out.wake)
        if result.status == "error":
            self.spool.quarantine(job.image_id, result.reason or "error", result.text)
        else:
            self.spool.mark_done(job.image_id)
