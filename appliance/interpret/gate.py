"""The view/quality gate: refuse what the model must not read, and say why.

Two sources, tags first because they are cheap and certain: a DICOM that says it is a CT, a lateral
or another body part is refused before inference; then the model's own view and out-of-distribution
outputs refuse laterals and non-chest images that carry no (or wrong) tags.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.image import ImageMeta
from appliance.ingest.dicom_meta import MALFORMED_CODES

RADIOGRAPHY_MODALITIES = {"CR", "DX", "DR", "RG", "DF", "PX", "OT", "SC"}
LATERAL_POSITIONS = {"LL", "RL", "LAT", "LATERAL", "RLD", "LLD"}
# Oblique projections (DICOM's RLO/LLO, and the RAO/LAO/RPO/LPO some units write): the model was
# validated on frontal films only.
OBLIQUE_POSITIONS = {"RLO", "LLO", "RAO", "LAO", "RPO", "LPO", "OBLIQUE"}
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "CHEST_LAT", "PORT CHEST", "TORAX", "TORSO"}


@dataclass(frozen=True)
class Refusal:
    reason: str
    detail: str
    source: str  # what the refusal traces to: "dicom.Modality", "view.lateral", "ood"


def gate_on_tags(meta: ImageMeta) -> Refusal | None:
    """Refuse from DICOM tags alone; PNG/JPEG carry none and pass to the model's gate."""
    malformed = meta.extra.get(MALFORMED_CODES, "").split(",")
    for key in ("Modality", "BodyPartExamined"):
        if key in malformed:  # "ABDOMEN/PELVIS", "HÜFTE": not a chest code; the value is not quoted
            return Refusal("not a chest X-ray", f"DICOM {key} is not a chest radiograph code", f"dicom.{key}")
    modality = (meta.modality or "").upper()
    if modality and modality not in RADIOGRAPHY_MODALITIES:
        return Refusal(
            "not a chest X-ray", f"DICOM Modality is {modality}, not a radiograph", "dicom.Modality"
        )
    view = (meta.view_position or "").upper().replace(" ", "")
    if view in LATERAL_POSITIONS:
        return Refusal("lateral view", f"DICOM ViewPosition is {meta.view_position}", "dicom.ViewPosition")
    if view in OBLIQUE_POSITIONS:
        return Refusal("oblique view", f"DICOM ViewPosition is {meta.view_position}", "dicom.ViewPosition")
    body_part = (meta.body_part or "").upper()
    if body_part and body_part not in CHEST_BODY_PARTS:
        return Refusal(
            "not a chest X-ray", f"DICOM BodyPartExamined is {meta.body_part}", "dicom.BodyPartExamined"
        )
    return None
