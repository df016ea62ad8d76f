"""The claim side of the loop: batches out of the spool, the next one read while this one is analysed.

Two stages on two cores: the read-ahead thread decodes and preprocesses batch k+1 while the loop infers,
interprets and hands off batch k (ONNX Runtime releases the GIL while it runs; libjpeg-turbo, OpenJPEG
and numpy's pooling release it for most of a decode). Without it a backlog used one core at a time: the
reader waited for the hand-off and the hand-off for the reader.

At most two batches are out of incoming/ at once, as before. An image that failed before (its failure
count is not zero: the process may have died reading it) is never read ahead and never read beside
another: it is handed out alone and unread, so the processor checks its count before reading it again and
a crash while reading it counts against it only.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from concurrent.futures import Future
from dataclasses import dataclass

from appliance.ingest.spool import Spool
from appliance.ingest.spool_records import SpoolFull, SpoolItem
from appliance.pipeline import PREFETCH, Analyzer, Job

log = logging.getLogger("appliance.feeder")


@dataclass
class _Batch:
    jobs: list[Job]
    reading: Future[None] | None  # None: not read ahead (a suspect, read by the processor)


class Feeder:
    def __init__(self, spool: Spool, batch: int) -> None:
        self.spool = spool
        self.batch = max(1, batch)
        self._ahead: _Batch | None = None

    def take(self, analyzer: Analyzer) -> list[Job]:
        """The next batch to analyse, read (or, for a suspect, unread); [] when nothing waits. The read
        of the batch after it has started when this returns."""
        current = self._ahead or self._claim(analyzer, alone_if_suspect=True)
        self._ahead = None
        if current is None:
            return []
        if current.reading is not None and self.spool.pending_count() > 0:
            self._ahead = self._claim(analyzer, alone_if_suspect=False)
        self._wait(current)
        return current.jobs

    def release(self) -> None:
        """Hand the batch read ahead back to incoming/ (a reload brings another model, a temporary fault
        stops the loop, the daemon stops): after a clean stop nothing is left in processing/ to count."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        self._wait(ahead)
        for job in ahead.jobs:
            with contextlib.suppress(OSError, sqlite3.Error, SpoolFull):
                self.spool.release(job.image_id)

    def _claim(self, analyzer: Analyzer, *, alone_if_suspect: bool) -> _Batch | None:
        items = self.spool.claim(self.batch)
        if not items:
            return None
        suspects = [item for item in items if self.spool.crashes(item.image_id)]
        if suspects:
            keep = suspects[0] if alone_if_suspect else None
            for item in items:
                if item is not keep:
                    self.spool.release(item.image_id)
            return _Batch([_job(keep)], None) if keep is not None else None
        jobs = [_job(item) for item in items]
        return _Batch(jobs, PREFETCH.submit(analyzer.read_all, jobs))

    @staticmethod
    def _wait(batch: _Batch) -> None:
        if batch.reading is None:
            return
        try:
            batch.reading.result()
        except Exception:  # the jobs not read are read again by the processor, whose error rule counts
            log.debug("read-ahead stopped at an exception; the processor reads the rest", exc_info=True)
            for job in batch.jobs:
                if job.reading is None and job.tensor is None:
                    job.image = None  # half read: read again from the start


def _job(item: SpoolItem) -> Job:
    return Job(path=item.path, image_id=item.image_id, source=item.source)
