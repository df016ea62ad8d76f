"""A Secondary Capture of the image with the heatmap drawn over it (DERIVED\\SECONDARY).

The picture is the same grey image the model saw, as the reader decoded it once (VOI/window and
MONOCHROME1 applied; a decoder may have reduced its resolution to what the model needs), brought to the
source's size (at most MAX_SIDE), with the full float heatmap in warm colours where it is high (not the
64-px PNG of the MQTT payload, and only when the reading may show one), and "NOT FOR DIAGNOSTIC USE"
burned in.
It carries no pixel spacing on purpose: nobody should measure on it. It joins the source's study,
references the source image and names the algorithm like the SR does. It carries the source's Body
Part Examined (CHEST where the source has none: the appliance reads chest radiographs only), without
which Laterality (General Series, type 2C) would be required.

It is JPEG Baseline; the sender makes an uncompressed copy for a PACS that takes no JPEG.
"""

from __future__ import annotations

import re
from typing import Final

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit

from appliance import NOT_FOR_DIAGNOSTIC_USE
from appliance.dicomout import (
    SC_SERIES_NUMBER,
    DicomJob,
    DicomOutError,
    add_device_uid,
    common_kwargs,
    series_description,
)

MAX_SIDE: Final = 2048  # a review picture; larger images are scaled down
HOT_FROM: Final = 0.35  # heatmap values below this stay grey (it is normalised to [0, 1] per image)
MAX_ALPHA: Final = 0.55
# Radiographic display convention, the one the zones use too (image left = patient right).
DEFAULT_ORIENTATION: Final = ("L", "F")
DEFAULT_BODY_PART: Final = "CHEST"
_CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")  # VR CS


def resized(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float map resized to (width, height), bilinear."""
    if values.shape == (size[1], size[0]):
        return np.asarray(values, dtype=np.float32)
    image = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def overlay(grey: np.ndarray, heat: np.ndarray | None) -> np.ndarray:
    """RGB uint8: grey image, blended towards red-yellow where the heatmap is high."""
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if heat is not None:
        strength = np.clip((heat - HOT_FROM) / (1.0 - HOT_FROM), 0.0, 1.0)
        colour = np.stack([np.ones_like(heat), strength, np.zeros_like(heat)], axis=2)  # red -> yellow
        alpha = (MAX_ALPHA * strength)[..., None]
        rgb = (rgb * (1.0 - alpha) + colour * alpha).astype(np.float32)
    return np.asarray(np.clip(rgb * 255.0 + 0.5, 0, 255), dtype=np.uint8)


def burn_in(rgb: np.ndarray, text: str) -> np.ndarray:
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, image.height // 40))
    box = draw.textbbox((0, 0), text, font=font)
    margin = max(4, image.height // 100)
    draw.rectangle((0, 0, box[2] + 2 * margin, box[3] + 2 * margin), fill=(0, 0, 0))
    draw.text((margin, margin), text, fill=(255, 255, 0), font=font)
    return np.asarray(image)


def picture(job: DicomJob, rows: int, columns: int) -> np.ndarray:
    """The image as decoded for the model, at the source's size (at most MAX_SIDE), with the heatmap."""
    scale = min(1.0, MAX_SIDE / max(rows, columns))
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    heat = resized(job.heat, size) if job.heat is not None else None
    label = f"{NOT_FOR_DIAGNOSTIC_USE.upper()} - {job.result.provenance.model} {job.result.provenance.model_version}"
    if job.heat is not None:
        label += f" - heatmap: {job.heat_label}"
    return burn_in(overlay(np.clip(resized(job.pixels, size), 0.0, 1.0), heat), label)


def body_part(source: Dataset) -> str:
    """The source's Body Part Examined when it is a valid code string, else CHEST."""
    value = str(source.get("BodyPartExamined", "") or "").strip().upper()
    return value if _CODE_STRING.fullmatch(value) else DEFAULT_BODY_PART


def build_sc(job: DicomJob, source: Dataset, *, manufacturer: str) -> SCImage:
    """The heatmap Secondary Capture; `source` is the header of `job.source`."""
    result = job.result
    rows, columns = job.pixels.shape
    rgb = picture(job, int(source.get("Rows") or rows), int(source.get("Columns") or columns))
    orientation = tuple(str(v) for v in source.get("PatientOrientation", []) or ()) or DEFAULT_ORIENTATION
    laterality = str(source.get("Laterality", "") or "").strip().upper()
    try:
        sc = SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=rgb,
            photometric_interpretation="YBR_FULL_422",
            bits_allocated=8,
            coordinate_system="PATIENT",
            patient_orientation=orientation if len(orientation) == 2 else DEFAULT_ORIENTATION,
            laterality=laterality if laterality in ("R", "L") else None,
            series_number=SC_SERIES_NUMBER,
            series_description=series_description("heatmap"),
            transfer_syntax_uid=JPEGBaseline8Bit,
            **common_kwargs(result, "sc", manufacturer),
        )
    except (ValueError, TypeError) as exc:
        raise DicomOutError(
            f"Secondary Capture for image {result.image.image_id[:12]} refused: {exc}"
        ) from exc
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    sc.DerivationDescription = (
        f"Heatmap of '{job.heat_label}' by {result.provenance.model} {result.provenance.model_version}"
        if job.heat is not None
        else f"No heatmap from {result.provenance.model} {result.provenance.model_version}"
    )[:1024]
    sc.BodyPartExamined = body_part(source)
    sc.BurnedInAnnotation = "YES"
    sc.LossyImageCompression = "01"
    sc.LossyImageCompressionMethod = "ISO_10918_1"  # JPEG Baseline, kept in an uncompressed copy too
    add_device_uid(sc, result)
    return sc
