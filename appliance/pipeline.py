"""The stages wired together: read -> gate -> preprocess -> infer -> interpret -> Result.

`Analyzer` is the pure part (files in, Results out), shared by `cxr-appliance process`, the daemon,
tools/training/evaluate.py and tools/quality/bench.py. The daemon (appliance/daemon.py) adds the watcher, spool,
journal and MQTT around it. The pipeline imports the stages; no stage imports the pipeline.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance import __version__
from appliance.backends.base import Backend
from appliance.clock import now_iso
from appliance.config import AppConfig
from appliance.errors import InputRejected
from appliance.image import DecodedImage, ImageMeta
from appliance.ingest import read_image
from appliance.interpret.gate import gate_on_tags
from appliance.interpret.reading import Reading, errored, read_outputs, refused
from appliance.interpret.text import join
from appliance.manifest import Manifest
from appliance.preprocess import Geometry, preprocess
from appliance.result import ImageInfo, Provenance, Result

log = logging.getLogger(__name__)

# Message ids are derived, not random: re-processing an image after a crash yields the same id,
# so the outbox and every subscriber recognise the repeat.
MESSAGE_NAMESPACE = uuid.UUID("5b0c7f0e-3c1a-4b7e-9d51-2f4c8a6e1d90")
# Reads the next batch while the current one is inferred (here, and the daemon's appliance/feeder.py).
# One thread: decoding two cart images at once gained under 10 % on 2 cores (pydicom and GDCM hold the
# GIL) for ~50 MB more peak memory. Shared by every Analyzer of the process (a SIGHUP reload makes a new
# one); it starts on first use.
PREFETCH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")


@dataclass
class Timer:
    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + (time.perf_counter() - start) * 1000.0

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.stages.items()}


@dataclass
class Job:
    """One image on its way through the stages."""

    path: Path
    image_id: str
    source: str
    timer: Timer = field(default_factory=Timer)
    image: DecodedImage | None = None
    tensor: np.ndarray | None = None
    geometry: Geometry | None = None
    reading: Reading | None = None


def image_format(path: Path, meta: ImageMeta | None) -> str:
    if meta is not None:
        return meta.format
    suffix = path.suffix.lower()
    return {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".dcm": "dicom"}.get(suffix, "other")


class Analyzer:
    """Files in, Results out. Holds the manifest and one live backend session."""

    def __init__(
        self,
        config: AppConfig,
        manifest: Manifest,
        backend: Backend,
        patient_key: Callable[[ImageMeta], str | None] = lambda meta: None,
        site_overlay: str | None = None,
    ) -> None:
        """`manifest` already carries a site overlay's thresholds when `site_overlay` (its id) is given."""
        self.config = config
        self.manifest = manifest
        self.backend = backend
        self.patient_key = patient_key
        self.provenance = Provenance(
            model=manifest.name,
            model_version=manifest.version,
            onnx_sha256=backend.model_sha256,
            backend=backend.name,
            precision=backend.precision,
            appliance_version=__version__,
            device_uid=model_device_uid(manifest.name, backend.model_sha256),
            fallback_reason=backend.fallback_reason,
            site_overlay=site_overlay,
        )
        # The decoders may reduce resolution on the way in: the model never needs more than this.
        self.target_size = max(manifest.input.height, manifest.input.width)

    def warm_up(self) -> float:
        """Run one dummy batch so the first real image is not slow; returns milliseconds."""
        spec = self.manifest.input
        start = time.perf_counter()
        canvas = np.full((spec.height, spec.width), 0.5, dtype=np.float32)
        tensor, _ = preprocess(canvas, spec)
        self.backend.run(tensor[None])
        return (time.perf_counter() - start) * 1000.0

    # --- stages -------------------------------------------------------------------------------------

    def read(self, job: Job) -> None:
        """Decode and gate on tags; sets job.reading when the image stops here."""
        if job.reading is not None or job.image is not None:
            return  # decided before reading (no such file), or read ahead already
        try:
            with job.timer.stage("read"):
                job.image = read_image(
                    job.path, max_pixels=self.config.ingest.max_pixels, target_size=self.target_size
                )
        except InputRejected as exc:
            job.reading = errored(exc.reason, exc.detail or str(job.path.name))
            return
        refusal = gate_on_tags(job.image.meta)
        if refusal is not None:
            job.reading = refused(refusal, job.image.meta)
            return
        with job.timer.stage("preprocess"):
            job.tensor, job.geometry = preprocess(job.image.pixels, self.manifest.input)

    def infer(self, jobs: Sequence[Job]) -> None:
        """Run every job that still needs the model, in batches of at most max_batch."""
        pending = [job for job in jobs if job.reading is None and job.tensor is not None]
        limit = max(1, self.backend.max_batch)
        for start in range(0, len(pending), limit):
            chunk = pending[start : start + limit]
            batch = np.stack([job.tensor for job in chunk if job.tensor is not None])
            began = time.perf_counter()
            outputs = self.backend.run(batch)
            share = (time.perf_counter() - began) * 1000.0 / len(chunk)
            for index, job in enumerate(chunk):
                job.timer.stages["infer"] = share
                assert job.image is not None and job.geometry is not None
                with job.timer.stage("interpret"):
                    job.reading = read_outputs(
                        self.manifest,
                        {name: values[index] for name, values in outputs.items()},
                        job.geometry,
                        job.image.meta,
                        with_heatmap=self.config.mqtt.publish_heatmap,
                        pixels=job.image.pixels if self.config.mqtt.publish_thumbnail else None,
                    )

    def failed(self, job: Job, reason: str, detail: str) -> Result:
        """An `error` result for an image the stages could not finish (the file goes to quarantine)."""
        job.reading = errored(reason, detail)
        return self.result(job)

    def result(self, job: Job) -> Result:
        assert job.reading is not None
        meta = job.image.meta if job.image else None
        device = self.config.device
        bed = device.bed_for(meta.location if meta else None)
        location = bed or device.location
        if bed is None and meta is not None and meta.location and device.location_from_dicom:
            # Free text (it may name the patient): say that it was not used, never what it was.
            log.warning(
                "%s: DICOM location not in device.locations; published as %r", job.path.name, location
            )
        return Result(
            message_id=str(uuid.uuid5(MESSAGE_NAMESPACE, f"{job.image_id}/{self.backend.model_sha256}")),
            created_at=now_iso(),
            site=self.config.device.site,
            device_id=self.config.device.device_id,
            location=location,
            patient_key=self.patient_key(meta) if meta is not None else None,
            image=ImageInfo(
                image_id=job.image_id,
                source=job.source,
                format=image_format(job.path, meta),
                modality=meta.modality if meta else None,
                view_position=meta.view_position if meta else None,
                body_part=meta.body_part if meta else None,
                acquired_at=meta.acquired_at if meta else None,
                rows=meta.rows if meta else None,
                columns=meta.columns if meta else None,
                pixel_spacing_mm=meta.pixel_spacing_mm if meta else None,
            ),
            text=join(job.reading.sentences),
            provenance=self.provenance,
            timings_ms=job.timer.rounded(),
            **job.reading.payload_fields(),
        )

    def read_all(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self.read(job)

    def analyze_each(
        self, jobs: Sequence[Job], *, reraise: tuple[type[Exception], ...] = ()
    ) -> list[tuple[Job, Result | Exception]]:
        """`analyze`, with an exception counted against the image that raised it: a bug or an unexpected
        library error on one image must not cost the others, so a batch that raised is analysed again
        image by image. `reraise`: exceptions that are no image's fault (a backend that is down)."""
        try:
            return list(zip(jobs, self.analyze(jobs), strict=True))
        except reraise:
            raise
        except Exception as exc:
            if len(jobs) == 1:
                return [(jobs[0], exc)]
            log.exception("internal error in a batch of %d; analysing its images one by one", len(jobs))
            pairs: list[tuple[Job, Result | Exception]] = []
            for job in jobs:
                fresh = Job(path=job.path, image_id=job.image_id, source=job.source)
                pairs += self.analyze_each([fresh], reraise=reraise)
            return pairs

    def analyze(self, jobs: Sequence[Job]) -> list[Result]:
        """Reads, infers and interprets; with more jobs than one batch, the next batch is read while
        the current one is inferred (a backlog keeps both cores busy: decode is single-threaded)."""
        limit = max(1, self.backend.max_batch)
        chunks = [jobs[start : start + limit] for start in range(0, len(jobs), limit)]
        if len(chunks) <= 1:
            self.read_all(jobs)
            self.infer(jobs)
        else:
            ahead = PREFETCH.submit(self.read_all, chunks[0])
            for index, chunk in enumerate(chunks):
                ahead.result()
                if index + 1 < len(chunks):
                    ahead = PREFETCH.submit(self.read_all, chunks[index + 1])
                self.infer(chunk)
        return [self.result(job) for job in jobs]


def model_device_uid(name: str, sha256: str) -> str:
    """A DICOM UID for the algorithm that changes whenever the model file changes (2.25 = UUID form)."""
    return "2.25." + str(uuid.uuid5(MESSAGE_NAMESPACE, f"{name}/{sha256}").int)
