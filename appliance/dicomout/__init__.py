"""DICOM results for DICOM inputs: a Comprehensive SR (TID 1500) and a Secondary Capture with the heatmap.

Both are built with highdicom, which checks the objects as it builds them: an object it refuses is
never written. Both name the algorithm (model name, version, and Result.provenance.device_uid as
Device UID, which changes whenever the model file does) and say "Not for diagnostic use" in their
series description. Instance UIDs derive from the result's message id, so writing the same result
again (after a crash) gives the same objects, which a PACS treats as one. Both are UTF-8 (ISO_IR 192):
the result's text holds characters such as "→" that ISO_IR 100 (Latin-1) cannot carry.

Both are renderings of one analysis (a DicomJob), as the MQTT payload is: no MQTT option changes them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from pydicom.dataset import Dataset

from appliance import NOT_FOR_DIAGNOSTIC_USE, __version__
from appliance.errors import ApplianceError
from appliance.result import Result

UID_NAMESPACE: Final = uuid.UUID("6f4b7c1e-3c55-4d0e-9a0b-2f6d3f6f0c21")
SR_SERIES_NUMBER: Final = 9901
SC_SERIES_NUMBER: Final = 9902
SPECIFIC_CHARACTER_SET: Final = "ISO_IR 192"  # UTF-8, whatever the source's character set was


@dataclass(frozen=True)
class DicomJob:
    """What the SR and the SC are rendered from: the result and the analysis behind it."""

    result: Result
    source: Path  # the DICOM input: its header is copied, its pixels are not decoded again
    name: str  # the input's name in the spool, for the log
    pixels: np.ndarray  # float [0, 1], as the reader decoded it for the model (VOI, MONOCHROME1 applied)
    # The full float heatmap over the image, only when the reading may show one (docs/reading.md).
    heat: np.ndarray | None = None
    heat_label: str | None = None


class DicomOutError(ApplianceError):
    """A DICOM result object could not be built (highdicom refused it) or written."""


def derived_uid(result: Result, kind: str) -> str:
    """A UID (2.25 = UUID form) fixed by the result and the object kind ('sr', 'sr-series', ...)."""
    return "2.25." + str(uuid.uuid5(UID_NAMESPACE, f"{result.message_id}/{kind}").int)


def series_description(kind: str) -> str:
    return f"CXR AI {kind} - {NOT_FOR_DIAGNOSTIC_USE}"


def software_versions(result: Result) -> list[str]:
    return [result.provenance.model_version, f"cxr-appliance {__version__}"]


def common_kwargs(result: Result, kind: str, manufacturer: str) -> dict[str, Any]:
    """Series and General Equipment attributes shared by the SR and the SC (highdicom keywords)."""
    # highdicom (and pydicom's code dictionary) load only when an output is built: a cart without
    # DICOM outputs does not pay their start-up time and memory.
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return {
        "series_instance_uid": derived_uid(result, f"{kind}-series"),
        "sop_instance_uid": derived_uid(result, kind),
        "instance_number": 1,
        "specific_character_set": SPECIFIC_CHARACTER_SET,
        "manufacturer": manufacturer,
        "manufacturer_model_name": result.provenance.model,
        "software_versions": software_versions(result),
        "contributing_equipment": [
            hd.ContributingEquipment(
                manufacturer=manufacturer,
                purpose_of_reference=codes.DCM.ProcessingEquipment,
                manufacturer_model_name=result.provenance.model,
                software_versions=software_versions(result),
                contribution_description=(
                    f"AI analysis ({result.provenance.backend}, {result.provenance.precision})"
                ),
            )
        ],
    }


def add_device_uid(ds: Dataset, result: Result) -> None:
    """Device UID (General Equipment): the algorithm's identity, which changes with the model file."""
    if result.provenance.device_uid:
        ds.DeviceUID = result.provenance.device_uid
