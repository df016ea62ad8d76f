"""The tags the appliance reads from a DICOM (view, body part, location, patient, acquisition time)
into ImageMeta; placeholder dates are published as unknown."""

from __future__ import annotations

import re
from datetime import datetime

from pydicom.dataset import Dataset

from appliance.image import ImageMeta
from appliance.ingest.dicom_checks import int_tag

# Acquisition dates before ACR-NEMA (1985) are placeholders: 19000101 or 19010101 from anonymisers,
# 19700101 from a clock never set. So are dates past next year (99991231).
_FIRST_PLAUSIBLE_YEAR = 1985


# A Code String (PS3.5 6.2 CS): at most 16 of upper-case letters, digits, space and underscore. The
# view, body part and modality are published and quoted in refusals; a value that is not a code (a
# name typed into the wrong field at the console) is read as absent, so it never reaches the ward.
# Lower case and '-' are allowed too: units write "Chest" or "PA-ERECT", and the gate upper-cases.
_CODE_STRING = re.compile(r"[A-Za-z0-9 _-]{1,16}")
# ImageMeta.extra key: the coded tags that were present but not code strings ("Modality,BodyPartExamined").
MALFORMED_CODES = "malformed_codes"


def image_meta(ds: Dataset) -> ImageMeta:
    def text(key: str) -> str | None:
        value = ds.get(key)
        if value is None or value == "":
            return None
        return str(value).strip() or None

    malformed: list[str] = []  # present, but not a code string: the gate refuses on these without quoting

    def code(key: str) -> str | None:
        value = text(key)
        if value is None or _CODE_STRING.fullmatch(value):
            return value
        malformed.append(key)
        return None

    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    pixel_spacing: tuple[float, float] | None = None
    if spacing is not None and len(spacing) == 2:
        try:
            pixel_spacing = (float(spacing[0]), float(spacing[1]))
        except (TypeError, ValueError):
            pixel_spacing = None
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) or None
    extra: dict[str, str] = {}
    for key, label in (
        ("NumberOfFrames", "frames"),
        ("SOPClassUID", "sop_class_uid"),
        ("Manufacturer", "manufacturer"),
        ("IssuerOfPatientID", "IssuerOfPatientID"),  # part of the patient's identity (appliance.pseudonym)
    ):
        value = text(key)
        if value:
            extra[label] = value
    modality, view_position, body_part = code("Modality"), code("ViewPosition"), code("BodyPartExamined")
    if malformed:
        extra[MALFORMED_CODES] = ",".join(malformed)
    return ImageMeta(
        format="dicom",
        sop_instance_uid=text("SOPInstanceUID"),
        study_instance_uid=text("StudyInstanceUID"),
        series_instance_uid=text("SeriesInstanceUID"),
        modality=modality,
        view_position=view_position,
        body_part=body_part,
        acquired_at=acquisition_time(ds),
        patient_id=text("PatientID"),
        patient_name=text("PatientName"),
        location=text("CurrentPatientLocation") or text("StationName"),
        rows=int_tag(ds, "Rows") or None,
        columns=int_tag(ds, "Columns") or None,
        bits_stored=int_tag(ds, "BitsStored") or None,
        photometric=text("PhotometricInterpretation"),
        transfer_syntax=ts,
        pixel_spacing_mm=pixel_spacing,
        extra=extra,
    )


def acquisition_time(ds: Dataset) -> str | None:
    """ISO 8601 from Acquisition, else Content, else Study date/time; with TimezoneOffsetFromUTC if any.

    None when none of them holds a real date (missing, unparseable or a placeholder)."""
    offset = _tz(str(ds.get("TimezoneOffsetFromUTC", "") or ""))
    dt_value = str(ds.get("AcquisitionDateTime", "") or "").strip()
    if dt_value:
        parsed = _parse_dt(dt_value[:8], dt_value[8:])
        if parsed:
            # A DT's own offset (…120000+0100) is the most specific; TimezoneOffsetFromUTC otherwise.
            own = _tz(dt_value[-5:]) if len(dt_value) > 13 else None
            return parsed + (own or offset or "")
    for date_key, time_key in (
        ("AcquisitionDate", "AcquisitionTime"),
        ("ContentDate", "ContentTime"),
        ("StudyDate", "StudyTime"),
    ):
        parsed = _parse_dt(str(ds.get(date_key, "") or ""), str(ds.get(time_key, "") or ""))
        if parsed:
            return parsed + (offset or "")
    return None


def _parse_dt(date: str, time: str) -> str | None:
    date = date.strip()
    if len(date) != 8 or not date.isdigit():
        return None
    # A DT value may carry its own offset (e.g. 120000+0100): keep only the time part here.
    time = time.strip().split("+")[0].split("-")[0]
    whole, _, frac = time.partition(".")
    whole = (whole + "000000")[:6] if whole.isdigit() else "000000"
    try:
        stamp = datetime.strptime(date + whole, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    if not _FIRST_PLAUSIBLE_YEAR <= stamp.year <= datetime.now().year + 1:
        return None  # a placeholder: unknown, not 1901
    iso = stamp.isoformat()
    if frac.isdigit():
        iso += "." + frac[:6]
    return iso


def _tz(value: str) -> str | None:
    value = value.strip()
    if len(value) == 5 and value[0] in "+-" and value[1:].isdigit():
        return f"{value[:3]}:{value[3:]}"
    return None
