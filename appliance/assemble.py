"""Build the long-lived pieces from a config: manifest, backend, Analyzer."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from appliance.backends.select import create_backend
from appliance.config import AppConfig
from appliance.hashing import sha256_file
from appliance.image import ImageMeta
from appliance.ingest import reasons
from appliance.interpret.reading import errored
from appliance.manifest import load_manifest
from appliance.overlay import apply, describe, load_for
from appliance.pipeline import Analyzer, Job
from appliance.pseudonym import PatientKeys

log = logging.getLogger(__name__)


def build_analyzer(config: AppConfig, *, salt_required: bool = True, create_salt: bool = True) -> Analyzer:
    """Load the model and start a backend. `salt_required=False` (the `process` command) uses a
    throw-away salt when the configured salt file cannot be read or created, so keys are not
    comparable; `create_salt=False` never writes one (a one-off run on built-in defaults)."""
    manifest = load_manifest(config.inference.model)
    overlay_id = None
    if config.inference.site_overlay is not None:
        # Checked before the backend starts: an overlay for another model stops here, plainly.
        overlay = load_for(config.inference.site_overlay, manifest, config.inference.model)
        log.info("%s", describe(overlay, manifest))
        manifest, overlay_id = apply(manifest, overlay), overlay.id
    backend = create_backend(manifest, config.inference)
    keys = PatientKeys.from_config(config.privacy, create=create_salt, ephemeral_ok=not salt_required)

    def patient_key(meta: ImageMeta) -> str | None:
        if not config.privacy.publish_patient_key:
            return None
        return keys.key(meta.patient_id, issuer=meta.extra.get("IssuerOfPatientID"))

    analyzer = Analyzer(config, manifest, backend, patient_key=patient_key, site_overlay=overlay_id)
    warm_ms = analyzer.warm_up()
    log.info(
        "model %s %s loaded on %s/%s, warm-up %.0f ms",
        manifest.name,
        manifest.version,
        backend.name,
        backend.precision,
        warm_ms,
    )
    return analyzer


def job_for_file(path: Path, source: str) -> Job:
    """A job for a file outside the spool (the `process` command): id from the content hash."""
    # Without content to hash (missing, unreadable), the id comes from the path: never the hash of
    # nothing, which every such file would share.
    by_path = hashlib.sha256(os.fsencode(path)).hexdigest()[:32]
    try:
        image_id = sha256_file(path)[:32]
    except FileNotFoundError:
        # A typo or a dangling link on the command line: not a file that "vanished" while being read.
        job = Job(path=path, image_id=by_path, source=source)
        job.reading = errored(reasons.NO_SUCH_FILE, str(path))
        return job
    except OSError:
        image_id = by_path  # read() will report the real reason for this file
    return Job(path=path, image_id=image_id, source=source)
