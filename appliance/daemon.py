"""The daemon: wiring, signals, reload, faults and the loop that claims images from the spool.

What happens to one image (analyse, priors, journal, outputs, done/quarantine, the error rule) is the
processor's (appliance/processor.py); the sources (folder watcher, DICOM receiver) hand files to the
intake (appliance/ingest/intake.py); this module connects them and says on the status topic whether
the cart accepts images.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from appliance import sdnotify
from appliance.assemble import build_analyzer
from appliance.config import AppConfig, load_config
from appliance.errors import ApplianceError, BackendUnavailable, InputRejected, UserError
from appliance.feeder import Feeder
from appliance.ingest.intake import FOLDER, Intake, Verdict
from appliance.ingest.spool import Spool
from appliance.ingest.spool_records import SpoolFull
from appliance.ingest.watcher import FolderWatcher
from appliance.journal import Journal
from appliance.logs import setup_logging
from appliance.ops.drift_monitor import DriftMonitor
from appliance.ops.metrics import Metrics
from appliance.overlay import stated_id
from appliance.pipeline import Analyzer, Job
from appliance.processor import TEMPORARY, ImageProcessor
from appliance.publish import history
from appliance.publish.mqtt import MqttPublisher
from appliance.publish.outbox import LEGACY_OUTBOX, Outbox
from appliance.result import Acknowledgement, Result
from appliance.retention import housekeeping
from appliance.store import Store

if TYPE_CHECKING:  # loaded when enabled: pynetdicom and highdicom cost start-up time and memory
    from appliance.dicomnet.receiver import DicomReceiver
    from appliance.dicomout.writer import DicomOutWriter

log = logging.getLogger("appliance.daemon")

HOUSEKEEPING_SECONDS = 600.0
# Sections bound to open files, sockets or threads at start: a SIGHUP cannot swap them in place.
RETRY_SECONDS = 5.0
RESTART_SECTIONS = ("ingest", "mqtt", "journal", "privacy", "dicom_net", "dicom_out", "metrics")


class Daemon:
    def __init__(self, config: AppConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.reload_requested = False
        # Why the cart is not accepting images, by cause ("disk", "storage", "backend"); empty = accepting.
        # Each cause is set and cleared by its own check, so one cannot clear another's.
        self._faults: dict[str, str] = {}
        self._state_lock = threading.Lock()  # faults change from the watcher thread and the loop
        self.metrics = Metrics(config)  # in memory from the start; served once _start has run
        self.drift = DriftMonitor(config.drift, self.metrics, on_change=self._publish_status)

    # --- signals -----------------------------------------------------------------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: finishing the image in progress, then stopping", signal.Signals(signum).name)
        self.stop_event.set()
        self.wake.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True
        self.wake.set()

    # --- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> int:
        setup_logging(self.config.logging.level, self.config.logging.format)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        # `kill -USR1 <pid>` writes every thread's stack to the journal: for a cart that seems hung.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        sdnotify.status("loading model")
        self._start()
        sdnotify.ready()
        sdnotify.status("watching")
        log.info("ready: watching %s", ", ".join(str(p) for p in self.watched()))
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def watched(self) -> list[Path]:
        return [self.config.ingest.watch, *self.config.ingest.extra_watch]

    def _start(self) -> None:
        ingest = self.config.ingest
        for folder in (ingest.watch, ingest.spool, self.config.journal.path.parent):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"{folder}: cannot create: {exc.strerror}") from exc
        # One database for spool state, journal and outbox (appliance/store.py), at journal.path.
        self.store = Store(self.config.journal.path, "appliance database")
        self.spool = Spool.from_config(self.config, self.store)
        # Every source hands its files to this one intake (appliance/ingest/intake.py): one gate, one
        # size limit, one quarantine, counted once. A full spool found by any source stops accepting.
        self.intake = Intake.from_config(
            self.config,
            self.spool,
            not_accepting=self._not_accepting,
            metrics=self.metrics,
            on_spool_full=lambda why: self._set_fault("disk", f"spool disk full: {why}"),
        )
        self._folder_rules = replace(FOLDER, move=ingest.delete_from_watch)
        recovered = self.spool.recover()
        if recovered:
            log.warning("recovered %d image(s) left in processing after an unclean stop", recovered)
        self.journal = Journal.from_config(self.config.journal, self.store)
        # Load the model before connecting, so `online` is only ever said by a cart that can read.
        self.analyzer: Analyzer = build_analyzer(self.config)
        self._rebuild_drift()
        self.publisher: MqttPublisher | None = None
        if self.config.mqtt.enabled:
            self.outbox = Outbox.from_config(self.store, self.config.mqtt)
            self.outbox.adopt(ingest.spool / LEGACY_OUTBOX)
            backend = self.analyzer.backend
            self.publisher = MqttPublisher(
                self.config.mqtt,
                self.config.device,
                self.outbox,
                on_ack=self._on_ack,
                on_history=lambda request: history.answer(self.journal, request, self.config.device),
                identity={
                    "model": self.analyzer.manifest.name,
                    "backend": backend.name,
                    "precision": backend.precision,
                },
            )
        self.watcher = FolderWatcher(
            [
                (self.config.ingest.watch, "inbox"),
                *((p, f"extra:{p.name}") for p in self.config.ingest.extra_watch),
            ],
            on_ready=self._accept,
            on_rejected=self._rejected,
            stable_seconds=ingest.stable_seconds,
            poll_seconds=ingest.poll_seconds,
            extensions=ingest.extensions,
        )
        self.watcher.start()
        self.dicom_out: DicomOutWriter | None = None
        if self.config.dicom_out.enabled:
            from appliance.dicomout.writer import DicomOutWriter

            self.dicom_out = DicomOutWriter.from_config(self.config).start()
        self.receiver: DicomReceiver | None = None
        if self.config.dicom_net.enabled:
            from appliance.dicomnet.receiver import DicomReceiver

            self.receiver = DicomReceiver.from_config(
                self.config, self.intake, on_accepted=self.wake.set
            ).start()
        self.feeder = Feeder(self.spool, self.config.inference.max_batch)
        self.processor = ImageProcessor(
            self.store,
            self.spool,
            self.journal,
            self.analyzer,
            publisher=self.publisher,
            dicom_out=self.dicom_out,
            on_finished=self._finished,
            log_skipped_thumbnails=self.config.mqtt.publish_thumbnail,
        )
        self.metrics.start(self.spool, self.publisher, self.analyzer)
        # Last: `online` is said only by a cart whose every part started (a receiver that cannot listen
        # ends the start before the ward ever hears of it).
        if self.publisher is not None:
            self._publish_status()
            self.publisher.start()

    def _shutdown(self) -> None:
        sdnotify.stopping()
        self.metrics.close()  # first: a scrape must not read the databases closed below
        if self.receiver is not None:
            self.receiver.stop()
        self.watcher.stop()
        if self.dicom_out is not None:
            self.dicom_out.close()
        if self.publisher is not None:
            if not self.publisher.flush(timeout=10.0):
                log.warning("outbox not empty at shutdown (%d left); sent at next start", self.outbox.depth())
            self.publisher.close()  # publishes the retained `offline` itself
        self.analyzer.backend.close()
        self.store.close()
        log.info("stopped after %d image(s)", self.processor.processed)

    def reload(self) -> None:
        """SIGHUP: re-read the config without dropping queued work (it stays in the spool).

        The bed, logging and inference (the model is reloaded if it changed) apply at once; the site and
        device id (they name the MQTT topics and the last will) and sections
        that own open files, sockets or threads (ingest, mqtt, journal, privacy, DICOM) need a restart."""
        self.reload_requested = False
        if self.config_path is None:
            log.info("SIGHUP: no config file to reload")
            return
        sdnotify.reloading()
        try:
            self._reload(self.config_path)
        except Exception:  # a reload must never stop a cart that is reading: the running config stays
            log.exception("SIGHUP: reload failed; keeping the running configuration")
        finally:
            sdnotify.ready()

    def _reload(self, path: Path) -> None:
        try:
            new = load_config(path)
        except UserError as exc:
            log.error("SIGHUP: keeping the running configuration: %s", exc)
            return
        needs_restart = [
            name for name in RESTART_SECTIONS if getattr(new, name) != getattr(self.config, name)
        ]
        identity = {"site": self.config.device.site, "device_id": self.config.device.device_id}
        if {"site": new.device.site, "device_id": new.device.device_id} != identity:
            needs_restart.append("device.site/device_id")
            new = new.model_copy(update={"device": new.device.model_copy(update=identity)})
        if needs_restart:
            log.warning("SIGHUP: %s changed; that takes effect at the next restart", ", ".join(needs_restart))
            kept = {name: getattr(self.config, name) for name in needs_restart if name in RESTART_SECTIONS}
            new = new.model_copy(update=kept)
        # `recalibrate` may rewrite the site overlay under the same name: its id says whether it changed.
        overlay_changed = stated_id(new.inference.site_overlay) != self.analyzer.provenance.site_overlay
        if new.inference != self.config.inference or overlay_changed:
            try:
                analyzer = build_analyzer(new)
            except ApplianceError as exc:
                log.error("SIGHUP: new model not loaded, keeping %s: %s", self.analyzer.manifest.name, exc)
                return
            self.feeder.release()  # read ahead for the old model's input
            self.analyzer.backend.close()
            self.analyzer = self.processor.analyzer = analyzer
            self.metrics.model(analyzer)
            overlay = analyzer.provenance.site_overlay
            log.info(
                "SIGHUP: model %s %s loaded, %s",
                analyzer.manifest.name,
                analyzer.manifest.version,
                f"site overlay {overlay[:12]}" if overlay else "no site overlay",
            )
        rebuild = not self.drift.is_for(new.drift, self.analyzer.manifest)
        self.config = new
        self.analyzer.config = new
        self.feeder.batch = max(1, new.inference.max_batch)
        if rebuild:
            self._rebuild_drift()
        setup_logging(new.logging.level, new.logging.format)
        log.info("SIGHUP: configuration reloaded")
        self._publish_status()

    # --- status ------------------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return not self._faults

    def _publish_status(self) -> None:
        if self.publisher is None:
            return
        with self._state_lock:  # one consistent picture, even when two threads change faults at once
            faults = "; ".join(self._faults.values())
            self.publisher.publish_status(
                "degraded" if faults else "online",
                reason=faults or self.analyzer.backend.fallback_reason,
                accepting=not faults,
                queue_depth=self.spool.pending_count(),
                model=self.analyzer.manifest.name,
                backend=self.analyzer.backend.name,
                precision=self.analyzer.backend.precision,
                drift=self.drift.drifted,
            )

    # --- ingest side (watcher thread) ----------------------------------------------------------------

    def _not_accepting(self) -> str | None:
        """The intake's gate: why the cart takes no image now, None when it does."""
        with self._state_lock:  # faults change from other threads while this one reads them
            return "; ".join(self._faults.values()) or None

    def _accept(self, path: Path, source: str) -> None:
        """Called by the watcher thread. Raising SpoolFull leaves the file where it is: the watcher
        offers it again later, so nothing dropped while the cart is not accepting is lost or quarantined."""
        outcome = self.intake.offer(path, source, self._folder_rules)
        if outcome.verdict is Verdict.DEFERRED:
            raise SpoolFull(outcome.reason)
        if outcome.verdict is Verdict.ACCEPTED:
            self.wake.set()

    def _rejected(self, path: Path, source: str, exc: InputRejected) -> None:
        """The watcher gave up on a file (never completed, unreadable): quarantine it with the reason."""
        self.intake.refuse(path, source, self._folder_rules, exc)

    def _on_ack(self, ack: Acknowledgement) -> None:
        # The journal drops (and logs) acks of messages it does not know.
        if self.journal.record_ack(ack):
            log.info("acknowledged by %s: %s (verdict %s)", ack.by, ack.message_id, ack.verdict or "none")

    def _set_fault(self, kind: str, reason: str | None) -> None:
        """Set (reason) or clear (None) one cause of not accepting; says so when accepting changes."""
        with self._state_lock:
            had = kind in self._faults
            if reason is None:
                self._faults.pop(kind, None)
            else:
                self._faults[kind] = reason
            self.metrics.fault(kind, reason is not None)
            if had == (reason is not None):
                return
        if reason is not None:
            log.error("not accepting images: %s", reason)
        else:
            log.info("%s problem over%s", kind, "; accepting images again" if self.accepting else "")
        self._publish_status()

    def _check_disk(self) -> None:
        """The spool's own rule (free space minus the reserve) decides; resuming needs some headroom
        above the reserve so one more file does not flip the state straight back."""
        free = self.spool.free_mb()
        reserve = self.config.ingest.min_free_mb
        if "disk" not in self._faults and free < reserve:
            self._set_fault("disk", f"spool disk full: {free:.1f} MB free, reserve {reserve:.1f} MB")
        elif "disk" in self._faults and free >= reserve + max(1.0, 0.1 * reserve):
            self._set_fault("disk", None)

    # --- processing loop (main thread) ---------------------------------------------------------------

    def _loop(self) -> None:
        ping_every = sdnotify.watchdog_interval()
        last_ping = last_housekeeping = 0.0
        while not self.stop_event.is_set():
            if time.monotonic() - last_housekeeping >= HOUSEKEEPING_SECONDS:
                last_housekeeping = time.monotonic()
                try:
                    housekeeping(self.config.ingest, self.journal, self.spool, self.dicom_out)
                except TEMPORARY as exc:  # a full disk: the next pass tries again
                    log.error("housekeeping: %s", exc)
            if ping_every is not None and time.monotonic() - last_ping >= ping_every / 2:
                sdnotify.watchdog()  # from the loop itself: a hung pipeline stops the pings
                last_ping = time.monotonic()
            if self.reload_requested:
                self.reload()
            self._check_disk()
            jobs: list[Job] = []
            try:
                jobs = self.feeder.take(self.analyzer)
                if not jobs:
                    # Nothing waits (what a failed hand-off released is claimed again first): the
                    # store answers, so a storage fault is over; a full disk is the "disk" fault's.
                    self._set_fault("storage", None)
                    self.wake.wait(timeout=self.config.ingest.poll_seconds)
                    self.wake.clear()
                    continue
                self.processor.process(jobs)
            except TEMPORARY as exc:
                kind = "backend" if isinstance(exc, BackendUnavailable) else "storage"
                log.error(
                    "%s problem (%s); %d image(s) wait, retry in %.0f s", kind, exc, len(jobs), RETRY_SECONDS
                )
                self.feeder.release()
                self.spool.hand_back(job.image_id for job in jobs)
                what = "run the model" if kind == "backend" else "write results" if jobs else "claim images"
                self._set_fault(kind, f"cannot {what}: {exc}")
                self.stop_event.wait(RETRY_SECONDS)
            else:
                self._set_fault("storage", None)
                self._set_fault("backend", None)
        self.feeder.release()  # stopping: what was read ahead goes back to incoming/, uncounted

    def _rebuild_drift(self) -> None:
        backend = self.analyzer.backend
        self.drift.rebuild(self.config.drift, self.analyzer.manifest, backend.model_sha256, self.journal)

    def _finished(self, job: Job, result: Result, analysed: bool) -> None:
        self.metrics.finished(result)
        if analysed:
            self.drift.observe(result, job.image.pixels if job.image else None)
