"""A site overlay: operating points chosen on a site's own labelled cases (`cxr-appliance recalibrate`).

The shipped manifest is never edited. The overlay is a separate YAML file named by
`inference.site_overlay`; at start and on SIGHUP the appliance checks that it was made for the loaded
model (name, version and the manifest file's sha256) and replaces the manifest's operating points
with its thresholds. Its id is the sha256 of its own content, so an edited file is refused and every
result can name exactly which overlay decided it (Result.provenance.site_overlay).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from appliance.errors import UserError
from appliance.manifest import Manifest, Role, sha256_file
from appliance.yamlsource import validate_yaml

OVERLAY_KIND: Final = "cxr-appliance/site-overlay/v1"
ABNORMAL = "abnormal"  # overlay key of the triage abnormal point; findings are "findings.<label>"
FINDINGS_PREFIX = "findings."


class OverlayError(UserError):
    """The site overlay is unreadable, edited by hand, or made for another model."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(Strict):
    metric: Literal["sensitivity", "specificity"]
    value: float = Field(gt=0, lt=1)


class CaseCount(Strict):
    positives: int = Field(ge=0)
    negatives: int = Field(ge=0)


class SiteOverlay(Strict):
    kind: Literal["cxr-appliance/site-overlay/v1"] = OVERLAY_KIND
    id: str = Field("", description="sha256 of the overlay's content without this field.")
    model: str
    model_version: str
    manifest_sha256: str = Field(description="sha256 of the manifest file the thresholds replace.")
    created_at: str
    source: str = Field(description="Where the labels came from (CSV file, clinicians' feedback).")
    target: Target
    thresholds: dict[str, float] = Field(min_length=1, description="'abnormal' or 'findings.<label>'.")
    cases: dict[str, CaseCount] = Field(description="Labelled cases per recalibrated output.")

    def content_id(self) -> str:
        body = self.model_dump(mode="json", exclude={"id"})
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def sealed(self) -> SiteOverlay:
        return self.model_copy(update={"id": self.content_id()})


def manifest_file(model: Path) -> Path:
    """The manifest YAML that `inference.model` names (it may name the model's folder)."""
    return model / "manifest.yaml" if model.is_dir() else model


def manifest_sha256(model: Path) -> str:
    path = manifest_file(model)
    try:
        return sha256_file(path)
    except OSError as exc:
        raise OverlayError(f"{path}: cannot read the manifest: {exc.strerror or exc}") from exc


def write_overlay(overlay: SiteOverlay, path: Path) -> None:
    from appliance.durable import write_atomically

    header = (
        "# Site operating points written by `cxr-appliance recalibrate` (see its report).\n"
        "# Do not edit: the id is the sha256 of this content and an edited file is refused.\n"
    )
    body = yaml.safe_dump(overlay.sealed().model_dump(mode="json"), sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (header + body).encode("utf-8"))


def read_overlay(path: Path) -> SiteOverlay:
    """Parse and check the id; says nothing yet about which model it fits (see `check`)."""
    if not path.is_file():
        raise OverlayError(f"{path}: site overlay not found (inference.site_overlay)")
    overlay = validate_yaml(SiteOverlay, path, error_class=OverlayError)
    if overlay.id != overlay.content_id():
        raise OverlayError(
            f"{path}: site overlay content does not match its id (edited by hand?);"
            " run `cxr-appliance recalibrate` again"
        )
    return overlay


def check(overlay: SiteOverlay, manifest: Manifest, sha256: str, path: Path) -> None:
    """Refuse an overlay made for another model, or one that would change an unvalidated output."""
    made_for = f"{overlay.model} {overlay.model_version} (manifest sha256 {overlay.manifest_sha256[:12]}…)"
    loaded = f"{manifest.name} {manifest.version} (manifest sha256 {sha256[:12]}…)"
    if (overlay.model, overlay.model_version, overlay.manifest_sha256) != (
        manifest.name,
        manifest.version,
        sha256,
    ):
        raise OverlayError(
            f"{path}: site overlay {overlay.id[:12]} was made for {made_for}, not the loaded {loaded};"
            " recalibrate for this model or remove inference.site_overlay"
        )
    for key in overlay.thresholds:
        problem = unpublishable(manifest, key)
        if problem:
            raise OverlayError(f"{path}: {key}: {problem}")
    abnormal = overlay.thresholds.get(ABNORMAL)
    urgent = manifest.triage.urgent_threshold
    if abnormal is not None and urgent is not None and abnormal > urgent:
        raise OverlayError(f"{path}: abnormal {abnormal:.4f} is above the manifest's urgent point {urgent}")


def unpublishable(manifest: Manifest, key: str) -> str | None:
    """Why `key` cannot be recalibrated on this model; None when it can. Recalibration moves the
    operating point of a validated output only: it can never publish one that failed validation."""
    if key == ABNORMAL:
        spec = manifest.output(Role.abnormal)
        if spec is not None and not spec.all_published():
            return "the abnormal score is not published by this model's validation"
        if spec is None and manifest.output(Role.findings) is None:
            return "this model has no abnormal score"
        return None
    if key.startswith(FINDINGS_PREFIX):
        label = key[len(FINDINGS_PREFIX) :]
        spec = manifest.output(Role.findings)
        if spec is None or label not in spec.labels or label == spec.normal_label:
            return f"this model has no finding {label!r}"
        if not spec.is_published(label):
            return f"{label} is not published (its validation did not clear the bar)"
        return None
    return "unknown output (expected 'abnormal' or 'findings.<label>')"


def shipped_threshold(manifest: Manifest, key: str) -> float | None:
    """The manifest's own operating point for `key` (what the overlay replaces)."""
    if key == ABNORMAL:
        if manifest.triage.abnormal_threshold is not None:
            return manifest.triage.abnormal_threshold
        spec = manifest.output(Role.abnormal)
        return spec.thresholds.get(spec.labels[0]) if spec is not None and spec.labels else 0.5
    spec = manifest.output(Role.findings)
    return spec.thresholds.get(key[len(FINDINGS_PREFIX) :], 0.5) if spec is not None else None


def apply(manifest: Manifest, overlay: SiteOverlay) -> Manifest:
    """The manifest with the overlay's thresholds in place of its operating points (a copy)."""
    findings = {
        key[len(FINDINGS_PREFIX) :]: value
        for key, value in overlay.thresholds.items()
        if key.startswith(FINDINGS_PREFIX)
    }
    abnormal = overlay.thresholds.get(ABNORMAL)
    outputs = []
    for spec in manifest.outputs:
        if spec.role == Role.findings and findings:
            spec = spec.model_copy(update={"thresholds": {**spec.thresholds, **findings}})
        elif spec.role == Role.abnormal and abnormal is not None and spec.labels:
            spec = spec.model_copy(update={"thresholds": {**spec.thresholds, spec.labels[0]: abnormal}})
        outputs.append(spec)
    triage = manifest.triage
    if abnormal is not None:
        triage = triage.model_copy(update={"abnormal_threshold": abnormal})
    return manifest.model_copy(update={"outputs": outputs, "triage": triage})


def load_for(path: Path, manifest: Manifest, model: Path) -> SiteOverlay:
    """Read the overlay at `path` and check it fits `manifest` (loaded from `model`)."""
    overlay = read_overlay(path)
    check(overlay, manifest, manifest_sha256(model), path)
    return overlay


def describe(overlay: SiteOverlay, manifest: Manifest) -> str:
    """One line for logs and doctor: which points the overlay moves, from what to what."""
    moves = ", ".join(
        f"{key} {value:.4f} (shipped {shipped_threshold(manifest, key)})"
        for key, value in overlay.thresholds.items()
    )
    return f"site overlay {overlay.id[:12]} of {overlay.created_at}: {moves}"


def stated_id(path: Path | None) -> str | None:
    """The id the overlay file at `path` states (None: no overlay; a marker when unreadable), so a
    reload can tell that a recalibration rewrote the file under the same name."""
    if path is None:
        return None
    try:
        return read_overlay(path).id
    except OverlayError:
        return "unreadable"
