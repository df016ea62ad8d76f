"""What a model is, as data: `engines/<model>/manifest.yaml`.

The appliance never hard-codes a model. The manifest says which ONNX files exist (per precision,
with sha256), how to turn a decoded image into the input tensor, and what each output means (its
role, labels, activation and operating points). A new model is a new folder, not new code.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from appliance.errors import ManifestError
from appliance.hashing import sha256_file
from appliance.yamlsource import validate_yaml


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class OnnxFile(Strict):
    file: str = Field(description="ONNX file name, relative to the manifest's folder.")
    sha256: str = Field(description="sha256 of the file; checked before a session is built.")
    gate: str | None = Field(None, description="Parity-gate report for quantised files (relative path).")


class Intensity(Strict):
    """Pixel values arrive as float32 in [0, 1] (0 = black, after VOI LUT and MONOCHROME1 inversion)."""

    range: tuple[float, float] = Field(
        (0.0, 1.0), description="Map [0, 1] linearly onto this range, e.g. [-1024, 1024] or [-1, 1]."
    )
    mean: list[float] = Field(
        default_factory=lambda: [0.0], description="Subtracted per channel after range."
    )
    std: list[float] = Field(default_factory=lambda: [1.0], description="Divided per channel after mean.")


class InputSpec(Strict):
    name: str = Field(description="ONNX input name.")
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: Literal[1, 3] = 1
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    dtype: Literal["float32", "float16"] = "float32"
    aspect: Literal["letterbox", "stretch", "center_crop"] = Field(
        "letterbox", description="letterbox keeps the whole image and pads; center_crop fills and trims."
    )
    pad_value: float = Field(
        0.0, description="Value in [0, 1] used for letterbox padding (before intensity)."
    )
    intensity: Intensity = Field(default_factory=Intensity)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One image's tensor shape without the batch axis, in this input's layout."""
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)

    @model_validator(mode="after")
    def _channels_match_normalisation(self) -> InputSpec:
        for field in ("mean", "std"):
            values = getattr(self.intensity, field)
            if len(values) not in (1, self.channels):
                raise ValueError(f"intensity.{field} has {len(values)} values for {self.channels} channel(s)")
        if any(s == 0 for s in self.intensity.std):
            raise ValueError("intensity.std must not contain 0")
        return self


class Role(str, Enum):
    view = "view"  # frontal vs lateral: refusal of laterals
    findings = "findings"  # class scores
    abnormal = "abnormal"  # one score for normal/abnormal triage
    severity = "severity"  # regression values with ranges
    risk = "risk"  # deterioration probability
    ood = "ood"  # out-of-distribution score: refuse above threshold
    heatmap = "heatmap"  # [N, h, w] localisation map in [0, 1]
    lung_mask = "lung_mask"  # [N, h, w] lung probability
    heart_mask = "heart_mask"  # [N, h, w] heart probability: with the lung mask, the cardiothoracic ratio
    embedding = "embedding"  # features, e.g. for the sequence risk model


class OutputSpec(Strict):
    name: str = Field(description="ONNX output name.")
    role: Role
    activation: Literal["softmax", "sigmoid", "none"] = Field(
        "none", description="Applied by the appliance; 'none' when the graph already outputs probabilities."
    )
    labels: list[str] = Field(default_factory=list, description="One label per column.")
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="Operating points chosen on validation, per label or per level."
    )
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict, description="Per-label value range.")
    units: dict[str, str] = Field(default_factory=dict, description="Per-label unit, e.g. 'of 8'.")
    normal_label: str | None = Field(None, description="findings: the label meaning 'no finding'.")
    refuse_labels: dict[str, str] = Field(
        default_factory=dict, description="view: label -> refusal reason, e.g. {lateral: 'lateral view'}."
    )
    published: list[str] | None = Field(
        None,
        description="The labels whose validation cleared the publication bar (model card); only these reach"
        " the payload, the text, the display and DICOM. heart_mask: [cardiothoracic_ratio] when the ratio"
        " is validated; heatmap: [zones] when the localisation passed its mirror test. Omitted: every"
        " label (a model brought in without a validation record).",
    )

    def is_published(self, label: str) -> bool:
        return self.published is None or label in self.published

    def all_published(self) -> bool:
        """Every label of this output passed validation (a one-score output: the score did)."""
        return all(self.is_published(label) for label in self.labels)

    @model_validator(mode="after")
    def _labels_known(self) -> OutputSpec:
        label_set = set(self.labels)
        derived = {Role.heart_mask: {"cardiothoracic_ratio"}, Role.heatmap: {"zones"}}.get(self.role, set())
        allowed = label_set | derived
        if self.published is not None and set(self.published) - allowed:
            raise ValueError(f"published names labels not in labels: {sorted(set(self.published) - allowed)}")
        for group in ("ranges", "units", "refuse_labels"):
            unknown = set(getattr(self, group)) - label_set
            if unknown:
                raise ValueError(f"{group} names labels not in labels: {sorted(unknown)}")
        if self.normal_label is not None and self.normal_label not in label_set:
            raise ValueError(f"normal_label {self.normal_label!r} is not in labels")
        if self.activation == "softmax" and len(self.labels) < 2:
            raise ValueError("softmax needs at least two labels")
        return self


class TriagePolicy(Strict):
    """How scores become a triage level; operating points come from validation."""

    abnormal_threshold: float | None = Field(None, description="abnormal score >= this: 'abnormal'.")
    urgent_threshold: float | None = Field(None, description="abnormal score >= this: 'urgent'.")
    urgent_extent: float | None = Field(None, description="severity extent >= this: 'urgent'.")
    urgent_risk: float | None = Field(None, description="deterioration risk >= this: 'urgent'.")
    cardiomegaly_ratio: float = Field(
        0.5, description="Cardiothoracic ratio >= this is stated as an enlarged cardiac silhouette."
    )
    measures_require: list[str] = Field(
        default_factory=list,
        description="Severity and deterioration risk are read only when one of these findings is named"
        " (their validation comes from those patients, e.g. COVID-19 and pneumonia); empty: always.",
    )


SequenceFeature = Literal["risk_logit", "risk_logit_change", "extent", "extent_change", "log_days"]


class SequenceRisk(Strict):
    """A small logistic model on one patient's current and prior results (tools/training/train_sequence_risk.py).

    Probability = sigmoid(intercept + sum(coefficients * (features - mean) / scale)); each feature is
    computed from the two Results by appliance/interpret/sequence_risk.py, so no extra model file."""

    enabled: bool = Field(
        False,
        description="Replace the single-image risk when a prior exists; true only if it was at least"
        " as good as the single-image risk on validation (see report).",
    )
    features: list[SequenceFeature] = Field(min_length=1)
    mean: list[float] = Field(description="Per-feature standardisation, from the training patients.")
    scale: list[float]
    coefficients: list[float]
    intercept: float
    threshold: float = Field(ge=0, le=1, description="Operating point: sequence risk >= this is 'high'.")
    report: str | None = Field(None, description="Validation report (relative path).")

    @model_validator(mode="after")
    def _lengths(self) -> SequenceRisk:
        n = len(self.features)
        if not len(self.mean) == len(self.scale) == len(self.coefficients) == n:
            raise ValueError(f"mean, scale and coefficients need one value per feature ({n})")
        if any(s <= 0 for s in self.scale):
            raise ValueError("scale values must be > 0")
        return self


class DriftQuantity(Strict):
    """One monitored quantity's distribution on the validation patients (appliance/ops/drift.py).

    numeric: `edges` are the inner bin edges (k-1 of them for k bins; the outer bins are open), a value
    v falls in bin searchsorted(edges, v, side='right'); categorical: one bin per category, unknown
    categories count as 'other'. `proportions` are already smoothed (no bin is 0)."""

    kind: Literal["numeric", "categorical"]
    edges: list[float] = Field(default_factory=list)
    categories: list[str] = Field(default_factory=list)
    proportions: list[float] = Field(min_length=2)
    n: int = Field(ge=1, description="Validation observations behind the proportions.")

    @model_validator(mode="after")
    def _bins(self) -> DriftQuantity:
        bins = len(self.edges) + 1 if self.kind == "numeric" else len(self.categories)
        if len(self.proportions) != bins:
            raise ValueError(f"{len(self.proportions)} proportions for {bins} bins")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must increase strictly")
        if any(p <= 0 for p in self.proportions) or abs(sum(self.proportions) - 1.0) > 1e-3:
            raise ValueError("proportions must be > 0 and sum to 1")
        return self


class DriftReference(Strict):
    """Reference distributions for the drift watch, written by tools/training/drift_reference.py."""

    source: str = Field(description="What the reference was computed on (split, data, precision).")
    images: int = Field(ge=1)
    smoothing: float = Field(0.5, gt=0, description="Pseudo-count added to every bin (both sides).")
    quantities: dict[str, DriftQuantity] = Field(min_length=1)


class Manifest(Strict):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: str
    description: str = ""
    intended_use: str = "Research demonstration. Not for diagnostic use."
    onnx: dict[Precision, OnnxFile] = Field(description="At least fp32; fp16/int8 when they passed the gate.")
    input: InputSpec
    outputs: list[OutputSpec] = Field(min_length=1)
    triage: TriagePolicy = Field(default_factory=TriagePolicy)
    heatmap_label: str | None = Field(None, description="Which finding/abnormal score the heatmap explains.")
    training: dict[str, str | int | float] = Field(default_factory=dict, description="Provenance, free form.")
    sequence_risk: SequenceRisk | None = Field(
        None, description="Deterioration risk from the current and prior image of a patient (optional)."
    )
    not_assessed: list[str] = Field(
        default_factory=list,
        description="What the model never assesses, said in every reading (e.g. 'pneumothorax').",
    )
    validation: dict[str, Any] = Field(
        default_factory=dict, description="Validation figures per output (model card), free form."
    )
    drift: DriftReference | None = Field(
        None, description="Validation distributions the drift watch compares recent images with."
    )

    # Filled in by load_manifest: the folder holding manifest.yaml.
    folder: Path = Field(Path("."), exclude=True)

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        if Precision.fp32 not in self.onnx:
            raise ValueError("onnx must list an fp32 file")
        names = [o.name for o in self.outputs]
        if len(names) != len(set(names)):
            raise ValueError("output names must be unique")
        return self

    def output(self, role: Role) -> OutputSpec | None:
        return next((o for o in self.outputs if o.role == role), None)

    def onnx_path(self, precision: Precision) -> Path:
        if precision not in self.onnx:
            available = ", ".join(p.value for p in self.onnx)
            raise ManifestError(f"model {self.name} has no {precision.value} ONNX (available: {available})")
        return self.folder / self.onnx[precision].file

    def verify_file(self, precision: Precision) -> str:
        """Check the ONNX file exists and matches its sha256; return the hash."""
        path = self.onnx_path(precision)
        if not path.is_file():
            raise ManifestError(f"{path}: ONNX file named by the manifest is missing")
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        expected = self.onnx[precision].sha256
        if digest != expected:
            raise ManifestError(
                f"{path}: sha256 {digest[:12]}… does not match the manifest's {expected[:12]}…"
                " (the file was changed; re-export or update the manifest)"
            )
        return digest


def load_manifest(path: Path) -> Manifest:
    """Load and validate a manifest; `path` may be the YAML file or its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.yaml"
    if not path.is_file():
        raise ManifestError(f"{path}: model manifest not found")
    manifest = validate_yaml(Manifest, path, error_class=ManifestError)
    return manifest.model_copy(update={"folder": path.parent.resolve()})
