"""One intake for every source: the folder watcher, the DICOM receiver and USB import hand it files.

`Intake.offer(path, source, rules)` applies the rules every source shares, in this order, and answers
with one `Outcome`:

1. the accepting gate: while the cart is not accepting (disk full, backend down...) nothing is taken
   and the file stays where it is (DEFERRED);
2. the size limit (`ingest.max_file_mb`): a larger file is quarantined unread (FILE_TOO_LARGE);
3. the non-image filter: content that is not DICOM/PNG/JPEG, an empty file, or a DICOM of a known
   non-image SOP class (report, presentation state, DICOMDIR) is not an image;
4. for a source that must answer before the file is spooled, the pre-decode check (`check_dicom`):
   what the reader would refuse unread is refused now;
5. the spool: de-duplication, a stable id, its own last checks (links, unreadable files).

Every refusal is quarantined with a short reason from `reasons` and counted once in the metrics
(`cxr_refusals_total{status="quarantined"}`); a spool that reports itself full is told to the owner
(`on_spool_full`, the daemon's "disk" fault) whichever source found out.

Where the sources differ on purpose, it is a field of `SourceRules`, and the three rule sets are
stated at the end of this module (FOLDER, NETWORK, USB). How a source answers its sender (keep and
retry, a DICOM status, a report count) is the source's own mapping of the `Outcome`.
"""

from __future__ import annotations

import enum
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from appliance.config import IngestConfig
from appliance.errors import InputRejected
from appliance.ingest import reasons, sniff
from appliance.ingest.dicom import check_dicom
from appliance.ingest.spool import Spool
from appliance.ingest.spool_records import Accepted, Duplicate, Rejected, SpoolFull
from appliance.ingest.uid_scan import scan_uids

if TYPE_CHECKING:
    from appliance.config import AppConfig

log = logging.getLogger(__name__)

# The limits a bare Intake (tools, tests) applies: the config's own defaults, stated once there.
DEFAULT_MAX_BYTES = int(IngestConfig.model_fields["max_file_mb"].default * 2**20)
DEFAULT_MAX_PIXELS = int(IngestConfig.model_fields["max_pixels"].default)

# What "not an image" means, for every source: skipped or quarantined as its rules say. Anything else
# refused (unreadable, vanished, a link) is always quarantined: it may be an image that went wrong.
NOT_AN_IMAGE = frozenset({reasons.EMPTY_FILE, reasons.UNKNOWN_FORMAT, reasons.NON_IMAGE_DICOM})


class Verdict(enum.Enum):
    ACCEPTED = "accepted"  # new in the spool's incoming/
    DUPLICATE = "duplicate"  # the spool has had it already
    QUARANTINED = "quarantined"  # refused with a reason; file (or a copy, or the reason alone) in quarantine/
    SKIPPED = "skipped"  # not an image, left alone (rules.skip_non_images)
    DEFERRED = "deferred"  # not now (not accepting, spool full, I/O error): the source keeps the file


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    reason: str = ""  # QUARANTINED/SKIPPED: a `reasons` constant; DEFERRED: why not now
    detail: str = ""
    image_id: str | None = None  # ACCEPTED/DUPLICATE
    key: str | None = None  # ACCEPTED/DUPLICATE: the spool's de-duplication key


@dataclass(frozen=True)
class SourceRules:
    """What one source does differently, on purpose. Everything else is the same for all sources."""

    # The file leaves the source once it is spooled or quarantined. False: it is copied, and the source
    # is never written (read-only media, a watched folder with ingest.delete_from_watch off).
    move: bool
    # Not an image (NOT_AN_IMAGE): left alone (True) or quarantined with the reason (False).
    skip_non_images: bool
    # Refuse what the reader would refuse before decoding, before the spool takes it: for a sender that
    # waits for an answer and must never hear "Success" for a file that will be refused.
    check_before_accept: bool


class QuarantineCounter(Protocol):
    """What the intake needs from appliance.ops.metrics.Metrics."""

    def quarantined(self, reason: str) -> None: ...


def _non_image_sop_class(path: Path) -> str | None:
    """The SOP class name when the file's meta names a known non-image class (SR, DICOMDIR...), else None.

    An unknown or private class is given the benefit of the doubt: the reader judges it."""
    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import UID

    try:
        scanned = scan_uids(path)
        sop = scanned.sop_class if scanned else read_file_meta_info(path).get("MediaStorageSOPClassUID")
    except Exception:
        return None  # no or broken File Meta: the reader says why later
    if sop is None:
        return None
    name = UID(str(sop)).name
    return name if name != str(sop) and "Image Storage" not in name else None


def _kind(path: Path) -> str:
    """'dicom', 'png' or 'jpeg'; InputRejected for anything that is not an image (or not readable)."""
    kind = sniff(path)
    if kind == "dicom" and (non_image := _non_image_sop_class(path)):
        raise InputRejected(reasons.NON_IMAGE_DICOM, f"{path.name}: {non_image}, not an image")
    return kind


class Intake:
    def __init__(
        self,
        spool: Spool,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        not_accepting: Callable[[], str | None] = lambda: None,
        metrics: QuarantineCounter | None = None,
        on_spool_full: Callable[[str], None] | None = None,
    ) -> None:
        """`not_accepting`: why the cart takes nothing now, None when it does (the daemon's faults)."""
        self.spool = spool
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.not_accepting = not_accepting
        self.metrics = metrics
        self.on_spool_full = on_spool_full

    @classmethod
    def from_config(
        cls,
        config: AppConfig,
        spool: Spool,
        *,
        not_accepting: Callable[[], str | None] = lambda: None,
        metrics: QuarantineCounter | None = None,
        on_spool_full: Callable[[str], None] | None = None,
    ) -> Intake:
        """The limits from `ingest`: the same for every source."""
        return cls(
            spool,
            max_bytes=int(config.ingest.max_file_mb * 2**20),
            max_pixels=config.ingest.max_pixels,
            not_accepting=not_accepting,
            metrics=metrics,
            on_spool_full=on_spool_full,
        )

    # --- the rules ---------------------------------------------------------------------------------

    def offer(self, path: Path, source: str, rules: SourceRules) -> Outcome:
        """Take one complete file, or say why not. Never raises for what a file or the spool can do.
        ACCEPTED is answered once the file is the spool's whatever happens next: a copy synced into
        incoming/, a file renamed from the source's folder found again in one of the two (see
        appliance/ingest/spool_accept.py)."""
        path = Path(path)
        why = self.not_accepting()
        if why:
            log.debug("not taking %s from %s now: %s", path, source, why)
            return Outcome(Verdict.DEFERRED, why)
        try:
            return self._offer(path, source, rules)
        except SpoolFull as exc:
            if self.on_spool_full is not None:
                self.on_spool_full(str(exc))
            log.debug("not taking %s from %s now: %s", path, source, exc)
            return Outcome(Verdict.DEFERRED, f"the spool is full ({exc})")
        except OSError as exc:  # an I/O error on either side: the source keeps the file and may retry
            log.error("%s from %s not taken: %s", path, source, exc.strerror or exc)
            return Outcome(Verdict.DEFERRED, f"I/O error: {exc.strerror or exc}")
        except sqlite3.Error as exc:  # e.g. another process held the database past the busy timeout
            log.error("%s from %s not taken: the spool's database: %s", path, source, exc)
            return Outcome(Verdict.DEFERRED, f"database: {exc}")

    def refuse(self, path: Path, source: str, rules: SourceRules, refusal: InputRejected) -> Outcome:
        """A file the source itself gave up on (never completed, a link leading out): quarantined like
        any other refusal. Raises SpoolFull/OSError when even that is impossible."""
        return self._quarantine(Path(path), source, rules, refusal)

    def _offer(self, path: Path, source: str, rules: SourceRules) -> Outcome:
        try:
            size = path.stat().st_size
        except OSError:
            size = 0  # gone or unreadable: the next check names the reason
        if size > self.max_bytes:
            # Unread: a file this large is no radiograph, and reading it is what a hostile one wants.
            detail = f"{path.name}: {size / 2**20:.0f} MB is over ingest.max_file_mb ({self.max_bytes / 2**20:g} MB)"
            return self._quarantine(path, source, rules, InputRejected(reasons.FILE_TOO_LARGE, detail))
        try:
            kind = _kind(path)
        except InputRejected as exc:
            if rules.skip_non_images and exc.reason in NOT_AN_IMAGE:
                log.info("skipped %s from %s: %s (%s)", path, source, exc.reason, exc.detail)
                return Outcome(Verdict.SKIPPED, exc.reason, exc.detail)
            return self._quarantine(path, source, rules, exc)
        if rules.check_before_accept and kind == "dicom":
            try:
                check_dicom(path, max_pixels=self.max_pixels)
            except InputRejected as exc:
                return self._quarantine(path, source, rules, exc)
            except Exception as exc:  # a parser bug must not become an acceptance, nor a file left behind
                log.exception("checking %s from %s failed", path, source)
                detail = f"{path.name}: {type(exc).__name__}: {exc}"
                return self._quarantine(path, source, rules, InputRejected(reasons.INVALID_DICOM, detail))
        got = self.spool.accept(path, source, move=rules.move)
        if isinstance(got, Rejected):  # the spool's own last checks (a link, unreadable): quarantined
            self._count(got.reason)
            return Outcome(Verdict.QUARANTINED, got.reason, got.detail)
        if isinstance(got, Duplicate):
            return Outcome(Verdict.DUPLICATE, image_id=got.image_id, key=got.key)
        assert isinstance(got, Accepted)
        return Outcome(Verdict.ACCEPTED, image_id=got.image_id, key=got.key)

    def _quarantine(self, path: Path, source: str, rules: SourceRules, refusal: InputRejected) -> Outcome:
        self.spool.quarantine_file(path, refusal.reason, refusal.detail, source, move=rules.move)
        self._count(refusal.reason)
        return Outcome(Verdict.QUARANTINED, refusal.reason, refusal.detail)

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.quarantined(reason)


def as_intake(target: Intake | Spool) -> Intake:
    """An Intake as given, or one with the default limits around a bare Spool (tools, tests)."""
    return target if isinstance(target, Intake) else Intake(target)


# --- the three sources, and how they differ (README "Ingest" has the table) ---------------------------

# A watched folder: the files were put there to be analysed, so a non-image is a mistake someone must
# see (quarantine). `move` follows ingest.delete_from_watch (the daemon replaces it).
FOLDER = SourceRules(move=True, skip_non_images=False, check_before_accept=False)
# C-STORE: the receive folder is ours (move); the unit waits for a status and takes "Success" as
# "delivered", so what the reader would refuse is refused before that answer.
NETWORK = SourceRules(move=True, skip_non_images=False, check_before_accept=True)
# A USB stick is read-only and carries other things (README, autorun.inf, reports): those are left
# alone, not quarantined, and nothing on the stick is ever written or deleted.
USB = SourceRules(move=False, skip_non_images=True, check_before_accept=False)
