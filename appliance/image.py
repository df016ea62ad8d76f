"""A decoded image and what we know about it: the contract between ingest and the later stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class ImageMeta:
    format: Literal["dicom", "png", "jpeg", "other"]
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    modality: str | None = None
    view_position: str | None = None
    body_part: str | None = None
    acquired_at: str | None = None  # ISO 8601; with offset when the DICOM gave one
    patient_id: str | None = None  # stays inside the appliance; only its salted hash leaves
    patient_name: str | None = None
    location: str | None = None  # bed/location when the modality wrote one (e.g. StationName)
    rows: int | None = None
    columns: int | None = None
    bits_stored: int | None = None
    photometric: str | None = None
    transfer_syntax: str | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DecodedImage:
    """Pixels as float32 in [0, 1], shape (H, W): 0 is black, after Modality LUT, VOI LUT/window
    and MONOCHROME1 inversion. `scale` is how much smaller than the stored image the pixels are
    (>1 when a decoder reduced resolution because the model needs no more)."""

    pixels: np.ndarray
    meta: ImageMeta
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.pixels.ndim != 2 or self.pixels.dtype != np.float32:
            raise ValueError(
                f"DecodedImage needs float32 (H, W), got {self.pixels.dtype} {self.pixels.shape}"
            )
