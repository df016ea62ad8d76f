"""The claim side of the loop: batches out of the spool, the next one read while this one is analysed.

Two stages on two cores: the read-ahead thread decodes and preprocesses batch k+1 while the loop infers,
interprets and hands off batch k (ONNX Runtime releases the GIL while it runs; libjpeg-turbo, OpenJPEG
called by ctypes and numpy's pooling release it for most of a decode). Without it a backlog used one core at a time: the reader
waited for the hand-off and the hand-off for the reader. Reading costs more than the rest (a lossless
JPEG ~50 ms, inference ~12), so the loop does not just wait for a batch still being read: it reads its
images from the back while the read-ahead thread reads from the front, each image by one of them.

At most two batches are out of incoming/ at once, as before. An image that failed before (its failure
count is not zero: the process may have died reading it) is never read ahead and never read beside
another: it is handed out alone and unread, so the processor checks its count before reading it again and
a crash while reading it counts against it only.

After each claim the loop syncs the spool's folders while the read-ahead thread reads: the files renamed
into the spool unsynced (appliance/ingest/spool_accept.py) reach the disk before the rows that end their
images; beside the read that costs the ward nothing measurable.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from appliance.ingest.spool import Spool
from appliance.ingest.spool_records import SPOOL_ERRORS, SpoolItem
from appliance.pipeline import PREFETCH, Analyzer, Job

log = logging.getLogger("appliance.feeder")


@dataclass
class _Batch:
    jobs: list[Job]
    reading: Future[None] | None = None  # None: not read ahead (a suspect, read by the processor)
    # Jobs [front, back) are not taken by a reader yet: the read-ahead thread takes from the front,
    # the loop from the back.
    front: int = field(default=0, init=False)
    back: int = field(default=0, init=False)
    lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.back = len(self.jobs)

    def next_unread(self, *, from_back: bool) -> Job | None:
        with self.lock:
            if self.front >= self.back:
                return None
            if from_back:
                self.back -= 1
                return self.jobs[self.back]
            self.front += 1
            return self.jobs[self.front - 1]

    def read(self, analyzer: Analyzer, *, from_back: bool) -> None:
        while (job := self.next_unread(from_back=from_back)) is not None:
            analyzer.read(job)


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
            try:
                self._ahead = self._claim(analyzer, alone_if_suspect=False)
            except SPOOL_ERRORS as exc:
                # This batch is claimed already: it goes on; the next is claimed after it (or the
                # claim fails again there, with nothing else handed out, and the loop keeps the fault).
                log.warning("cannot claim the next batch ahead (%s); it waits in incoming/", exc)
        if current.reading is not None:
            # While the read-ahead thread reads: the claimed files' folders reach the disk before any
            # row that ends their images is written (appliance/ingest/spool_accept.py). If the disk
            # refuses, the transaction that ends them tries again and the processor's rule applies.
            try:
                self.spool.settle_placements()
            except SPOOL_ERRORS as exc:
                log.warning("cannot sync the spool's folders now (%s); tried again with the results", exc)
        self._wait(current, analyzer)
        return current.jobs

    def release(self) -> None:
        """Hand the batch read ahead back to incoming/ (a reload brings another model, a temporary fault
        stops the loop, the daemon stops): after a clean stop nothing is left in processing/ to count."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        self._wait(ahead, None)
        self.spool.hand_back(job.image_id for job in ahead.jobs)

    def _claim(self, analyzer: Analyzer, *, alone_if_suspect: bool) -> _Batch | None:
        items = self.spool.claim(self.batch)
        if not items:
            return None
        try:
            suspects = [item for item in items if self.spool.crashes(item.image_id)]
            if suspects:
                keep = suspects[0] if alone_if_suspect else None
                for item in items:
                    if item is not keep:
                        self.spool.release(item.image_id)
                return _Batch([_job(keep)]) if keep is not None else None
        except SPOOL_ERRORS:
            # Claimed but not handed out: back to incoming/, or the next start would count them as crashes.
            self.spool.hand_back(item.image_id for item in items)
            raise
        batch = _Batch([_job(item) for item in items])
        batch.reading = PREFETCH.submit(batch.read, analyzer, from_back=False)
        return batch

    @staticmethod
    def _wait(batch: _Batch, analyzer: Analyzer | None) -> None:
        """`analyzer`: read what the read-ahead thread has not taken yet here (None: only wait)."""
        if batch.reading is None:
            return
        errors: list[Exception] = []
        if analyzer is not None:
            try:
                batch.read(analyzer, from_back=True)
            except Exception as exc:
                errors.append(exc)
        try:
            batch.reading.result()
        except Exception as exc:
            errors.append(exc)
        if errors:  # the jobs not read are read again by the processor, whose error rule counts
            log.debug("reading stopped at an exception; the processor reads the rest", exc_info=errors[0])
            for job in batch.jobs:
                if job.reading is None and job.tensor is None:
                    job.image = None  # half read: read again from the start


def _job(item: SpoolItem) -> Job:
    return Job(path=item.path, image_id=item.image_id, source=item.source)
