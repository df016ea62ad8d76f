"""Prometheus metrics of the daemon, served at http://<metrics.host>:<metrics.port>/metrics.

The daemon calls a few methods (`start`, `model`, `fault`, `finished`, `quarantined`, `close`); the
rest is read when Prometheus scrapes: spool backlog, outbox depth and age, disk free space,
temperatures (prometheus_client's process collector adds the resident memory). Every metric and the
alerts built on them are described in docs/metrics.md.

The HTTP server (metrics_http.py) is one thread serving one request at a time; what is read at
scrape time is metrics_scrape.py. Labels only take values from small fixed sets (stage names, refusal
reasons, the configured sources), never file names or patient data.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from appliance import __version__
from appliance.config import AppConfig, MetricsConfig
from appliance.ops.metrics_http import basic_auth, serve
from appliance.ops.metrics_scrape import DEVFREQ_ROOT, THERMAL_ROOT, StateCollector
from appliance.websecurity import off_loopback, server_context

if TYPE_CHECKING:  # type hints only: the daemon hands these in, metrics never builds them
    from appliance.ingest.spool import Spool
    from appliance.ops.drift import DriftWatch
    from appliance.pipeline import Analyzer
    from appliance.publish.mqtt import MqttPublisher
    from appliance.result import Result

log = logging.getLogger(__name__)

# The causes Daemon._set_fault knows; exported as 0 from the start so an alert sees the series
# before the first fault, not only after it.
FAULT_CAUSES = ("disk", "storage", "backend")
# Per stage: milliseconds for a PNG's preprocess up to seconds for a large DICOM's decode.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# From acceptance to hand-off: seconds when idle, minutes behind a backlog or after an outage.
END_TO_END_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)


class Metrics:
    """Everything the daemon exports, in a registry of its own (never prometheus_client's global one)."""

    def __init__(
        self, config: AppConfig, *, thermal_root: Path = THERMAL_ROOT, devfreq_root: Path = DEVFREQ_ROOT
    ) -> None:
        self.config: MetricsConfig = config.metrics
        self.thermal_root = thermal_root
        self.devfreq_root = devfreq_root
        self.registry = CollectorRegistry()
        self.spool: Spool | None = None
        self.publisher: MqttPublisher | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # faults change from the watcher thread and the loop
        self._active_faults: set[str] = set()
        # Read now (the daemon is being built), like mqtt.password_file: a bad path stops the start
        # before anything connects or says `online`.
        self._password = self.config.password() if self.config.enabled else None
        r = self.registry
        self.processed = Counter(
            "cxr_images_processed",
            "Images that got a result, by source folder, result status and triage level.",
            ["source", "status", "triage"],
            registry=r,
        )
        self.refusals = Counter(
            "cxr_refusals",
            "Images not read, by reason: status refused (gate, view, out of distribution), error"
            " (could not be decoded or processed) or quarantined (refused at ingest, before it had an id).",
            ["status", "reason"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "cxr_stage_duration_seconds",
            "Time per image in each pipeline stage (infer: the batch's time shared by its images).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "cxr_end_to_end_latency_seconds",
            "From the file's acceptance into the spool to its result being handed off"
            " (journal written, MQTT outbox stored, file moved to done/).",
            buckets=END_TO_END_BUCKETS,
            registry=r,
        )
        self.fault_gauge = Gauge(
            "cxr_fault",
            "1 while this cause keeps the cart from accepting images (disk, storage, backend), else 0.",
            ["cause"],
            registry=r,
        )
        self.accepting_gauge = Gauge(
            "cxr_accepting", "1 when the cart accepts new images, 0 while degraded.", registry=r
        )
        # Drift watch (docs/drift.md): one series per quantity the model's manifest carries a reference for.
        self.drift_psi = Gauge(
            "cxr_drift_psi",
            "Population stability index of a monitored quantity's recent window against the model's"
            " validation reference; present once the window holds drift.min_images observations.",
            ["quantity"],
            registry=r,
        )
        self.drift_gauge = Gauge(
            "cxr_drift",
            "1 while this quantity has drifted (PSI above drift.psi_threshold, until below drift.psi_clear),"
            " else 0. A warning: the cart keeps reading.",
            ["quantity"],
            registry=r,
        )
        self.drift_window = Gauge(
            "cxr_drift_window_observations",
            "Observations in the drift watch's window for this quantity (at most drift.window).",
            ["quantity"],
            registry=r,
        )
        self._drift_quantities: set[str] = set()
        self.model_info = Info("cxr_model", "The model in use.", registry=r)
        self.backend_info = Info(
            "cxr_backend",
            "The inference backend and precision in use; fallback_reason is set when it stands in for"
            " the preferred one (e.g. no TensorRT engine for this device).",
            registry=r,
        )
        self.appliance_info = Info("cxr_appliance", "This cart's software version and identity.", registry=r)
        self.appliance_info.info(
            {
                "version": __version__,
                "site": config.device.site,
                "device_id": config.device.device_id,
            }
        )
        for cause in FAULT_CAUSES:
            self.fault_gauge.labels(cause).set(0)
        self.accepting_gauge.set(1)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds (Linux)
        PlatformCollector(registry=r)  # python_info
        r.register(StateCollector(self))

    # --- called by the daemon ----------------------------------------------------------------------

    def start(self, spool: Spool, publisher: MqttPublisher | None, analyzer: Analyzer) -> None:
        """Bind what the scrape reads and open the HTTP endpoint (when enabled).

        A port that cannot be bound is logged, not fatal: the cart goes on reading images, and
        Prometheus reports the target down (the `CxrCartDown` alert) until it is fixed."""
        self.spool, self.publisher = spool, publisher
        self.model(analyzer)
        if not self.config.enabled:
            return
        app = make_wsgi_app(self.registry)
        if self.config.username and self._password is not None:
            app = basic_auth(app, self.config.username, self._password.get_secret_value())
        tls = self.config.tls
        try:
            context = server_context(tls.cert_file, tls.key_file, "metrics") if tls else None
            self._server = serve(self.config.host, self.config.port, app, context)
        except OSError as exc:
            log.error(
                "metrics: cannot listen on %s:%d (%s); running without the metrics endpoint",
                self.config.host,
                self.config.port,
                exc.strerror or exc,
            )
            return
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        log.info(
            "metrics at %s://%s:%d/metrics%s",
            "https" if tls else "http",
            self.config.host,
            self.port,
            " (basic auth)" if self.config.username else "",
        )
        if off_loopback(self.config.host) and not (tls and self.config.username):
            log.warning(
                "metrics: served beyond this machine on %s without %s; set metrics.tls and metrics.username",
                self.config.host,
                " and ".join(w for w, on in (("TLS", tls), ("a password", self.config.username)) if not on),
            )

    @property
    def port(self) -> int:
        """The port actually bound (for tests and the log)."""
        return int(self._server.server_address[1]) if self._server is not None else self.config.port

    def model(self, analyzer: Analyzer) -> None:
        """At start and after a SIGHUP loaded another model."""
        manifest, backend = analyzer.manifest, analyzer.backend
        self.model_info.info(
            {"name": manifest.name, "version": manifest.version, "onnx_sha256": backend.model_sha256}
        )
        self.backend_info.info(
            {
                "backend": backend.name,
                "precision": backend.precision,
                "fallback_reason": backend.fallback_reason or "",
            }
        )

    def drift(self, watch: DriftWatch) -> None:
        """After each image and when the watch is rebuilt (start, SIGHUP): the watch's current state."""
        quantities = set(watch.windows)
        for gone in self._drift_quantities - quantities:  # another model monitors other quantities
            for gauge in (self.drift_psi, self.drift_gauge, self.drift_window):
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
        self._drift_quantities = quantities
        drifted = set(watch.drifted)
        for name, window in watch.windows.items():
            self.drift_window.labels(name).set(len(window))
            self.drift_gauge.labels(name).set(1 if name in drifted else 0)
            if name in watch.psi:
                self.drift_psi.labels(name).set(watch.psi[name])
            else:  # not judged (yet): no number rather than a misleading 0
                with contextlib.suppress(KeyError):
                    self.drift_psi.remove(name)

    def fault(self, cause: str, active: bool) -> None:
        with self._lock:
            if active:
                self._active_faults.add(cause)
            else:
                self._active_faults.discard(cause)
            self.fault_gauge.labels(cause).set(1 if active else 0)
            self.accepting_gauge.set(0 if self._active_faults else 1)

    def finished(self, result: Result) -> None:
        """One image's result was handed off (journal, outbox, spool done/quarantine)."""
        self.processed.labels(result.image.source, result.status, result.triage or "none").inc()
        if result.status != "ok":
            self.refusals.labels(result.status, result.reason or "unknown").inc()
        for stage, milliseconds in result.timings_ms.items():
            self.stage_seconds.labels(stage).observe(milliseconds / 1000.0)
        accepted = self._accepted_at(result.image.image_id)
        if accepted is not None:
            elapsed = (datetime.now(timezone.utc) - accepted).total_seconds()
            if elapsed >= 0:  # a wall clock set back since acceptance: no honest number to give
                self.end_to_end_seconds.observe(elapsed)

    def quarantined(self, reason: str) -> None:
        """A file refused at ingest, before it became an image with an id (not an image, too large...)."""
        self.refusals.labels("quarantined", reason).inc()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- helpers -----------------------------------------------------------------------------------

    def _accepted_at(self, image_id: str) -> datetime | None:
        """The spool's acceptance time (its row survives restarts, so a backlog's wait counts)."""
        if self.spool is None:
            return None
        try:
            accepted = datetime.fromisoformat(self.spool.accepted_at(image_id) or "")
        except ValueError:
            return None
        return accepted if accepted.tzinfo else accepted.replace(tzinfo=timezone.utc)
