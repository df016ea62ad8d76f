"""The daemon's drift watch (appliance/ops/drift.py): one per model, refilled from the journal at start and
at each reload, fed every finished reading, its state on the metrics and, when it changes, the status.

A warning, never a fault: the set of drifted quantities goes to the log, the status topic and the metrics.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

import numpy as np

from appliance.config import DriftConfig
from appliance.journal import Journal
from appliance.manifest import Manifest
from appliance.ops.drift import DriftWatch, observations
from appliance.ops.metrics import Metrics
from appliance.result import Result

log = logging.getLogger("appliance.daemon")

# Stored results read back per drift-window slot at a rebuild: each quantity's window holds its last
# `window` observations, and most quantities are not observed on every image (scores only when read,
# severity only with a named finding): the last `window` results would leave those windows short and
# skewed to the latest images.
REBUILD_RESULTS_PER_WINDOW = 5


class DriftMonitor:
    def __init__(self, config: DriftConfig, metrics: Metrics, on_change: Callable[[], None]) -> None:
        self.watch = DriftWatch(config, None)  # the model's reference arrives with it (rebuild)
        self.metrics = metrics
        self.on_change = on_change  # says it on the status topic

    @property
    def drifted(self) -> list[str]:
        return self.watch.drifted

    def is_for(self, config: DriftConfig, manifest: Manifest) -> bool:
        return self.watch.config == config and self.watch.reference is manifest.drift

    def rebuild(self, config: DriftConfig, manifest: Manifest, model_sha256: str, journal: Journal) -> None:
        """A fresh watch for this model and drift config, its windows refilled from the journal (results
        of this very model file only: another model's scores are not comparable)."""
        self.watch = DriftWatch(config, manifest.drift)
        if not self.watch.active:
            why = "drift.enabled is false" if not config.enabled else "its manifest has no drift reference"
            log.info("drift watch off for %s: %s", manifest.name, why)
        else:
            try:
                stored = journal.recent(REBUILD_RESULTS_PER_WINDOW * config.window, model_sha256)
            except sqlite3.Error:
                log.exception("drift watch: journal not readable; windows start empty")
                stored = []
            self.watch.rebuild(stored)
            log.info(
                "drift watch on: %d quantities, %d stored result(s) reloaded%s",
                len(self.watch.windows),
                len(stored),
                f"; drifted: {self.watch.describe()}" if self.watch.drifted else "",
            )
        self.metrics.drift(self.watch)

    def observe(self, result: Result, pixels: np.ndarray | None) -> None:
        if not self.watch.active:
            return
        changed = self.watch.observe(observations(result, pixels))
        self.metrics.drift(self.watch)
        if changed:
            if self.watch.drifted:
                log.warning("drift: recent images differ from validation in %s", self.watch.describe())
            else:
                log.info("drift cleared: recent images match validation again")
            self.on_change()
