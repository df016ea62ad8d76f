"""Deleting files past their retention: every folder that holds patient data is bounded in time.

One rule for all of them (docs/deployment.md, "Retention"): a regular file is deleted once its
modification time is older than the limit. Symlinks and folders are left alone (a link is never
followed, so nothing outside the folder is ever deleted).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.config import IngestConfig
    from appliance.dicomout.writer import DicomOutWriter
    from appliance.ingest.spool import Spool
    from appliance.journal import Journal

log = logging.getLogger(__name__)
DAY_SECONDS = 86400


def purge_older(
    folder: Path, older_than_s: float, *, keep: Callable[[Path], bool] = lambda path: False
) -> list[Path]:
    """Delete the regular files directly in `folder` older than `older_than_s`, except those `keep`
    protects. Returns what was deleted; a missing folder is simply empty."""
    cutoff = time.time() - older_than_s
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        with contextlib.suppress(OSError):  # vanished meanwhile, or not ours to delete: next round
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff and not keep(path):
                path.unlink()
                removed.append(path)
    return removed


def housekeeping(
    ingest: IngestConfig, journal: Journal, spool: Spool, dicom_out: DicomOutWriter | None
) -> None:
    """The daemon's periodic pass: nothing that holds patient data (results, images, refused files, where
    files came from, DICOM outputs) is kept past its configured limit."""
    pruned = journal.prune()
    purged = spool.purge_done(ingest.keep_done_days * DAY_SECONDS)
    purged += spool.purge_quarantine(ingest.keep_quarantine_days * DAY_SECONDS)
    scrubbed = spool.scrub_records(ingest.keep_records_days * DAY_SECONDS)
    purged += dicom_out.purge() if dicom_out is not None else 0
    if pruned or purged or scrubbed:
        log.info(
            "housekeeping: %d old result(s) pruned, %d file(s) deleted, %d spool record(s) scrubbed",
            pruned,
            purged,
            scrubbed,
        )
