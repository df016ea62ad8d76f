"""A Comprehensive SR (TID 1500 Measurement Report) of one result.

Layout:
  Imaging Measurement Report (TID 1500), observer = the algorithm as a device (UID = device_uid)
    Procedure reported: plain chest X-ray
    Imaging Measurements: one TID 1501 group per item, each naming the algorithm and the source image
      - per finding: Probability (0-1) and a Present/Absent evaluation at the model's threshold
      - abnormal score, severity (geographic extent 0-8, opacity 0-6), deterioration risk (0-1)
    Qualitative Evaluations: triage level and the result's text (which ends "Not for diagnostic use.")

Model labels become SNOMED CT / DICOM codes (FINDING_CODES, else pydicom's code dictionary under the
same name), otherwise codes of the private scheme 99CXRAPP (declared in Coding Scheme Identification).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    ComprehensiveSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID

from appliance.dicomout import (
    SR_SERIES_NUMBER,
    DicomOutError,
    add_device_uid,
    common_kwargs,
    derived_uid,
    series_description,
)
from appliance.result import Result

PRIVATE: Final = "99CXRAPP"
PLAIN_CHEST_XRAY: Final = CodedConcept("399208008", "SCT", "Plain chest X-ray")
QUALITATIVE_EVALUATIONS: Final = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
NO_UNITS: Final = CodedConcept("1", "UCUM", "no units")
SCORE_UNIT: Final = CodedConcept("{score}", "UCUM", "score")
EXTENT: Final = CodedConcept("EXTENT", PRIVATE, "Geographic extent of lung involvement (0-8)")
OPACITY_DEGREE: Final = CodedConcept("OPACITY", PRIVATE, "Degree of lung opacity (0-6)")
DETERIORATION: Final = CodedConcept("DETERIORATION", PRIVATE, "Death, ICU admission or intubation")
CARDIOTHORACIC_RATIO: Final = CodedConcept(
    "CTR", PRIVATE, "Cardiothoracic ratio (heart width / thorax width)"
)
TRIAGE: Final = CodedConcept("TRIAGE", PRIVATE, "Triage level")


def _coded(code: Code) -> CodedConcept:
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


# "Abnormal" (the whole image) as the SCT finding, not the bare qualifier 263654008 "Abnormal".
ABNORMAL: Final = _coded(codes.SCT.ImagingResultAbnormal)  # SCT 408574004 "Imaging result abnormal"

# The model's finding labels (normalised: lower case, words) whose standard code is not found by
# name in pydicom's dictionary, or whose name there means something else on a chest radiograph.
# Codes taken from pydicom's dictionary are named there (codes.SCT.X), so a renamed one fails at import.
# Still private (99CXRAPP), as neither pydicom's nor highdicom's code tables have a code for them:
#   findings Atelectasis and Consolidation (the tables hold only the narrower "Plate-like atelectasis"),
#   and the measures/evaluations above: EXTENT, OPACITY, DETERIORATION, CTR, TRIAGE and the triage levels.
FINDING_CODES: Final[dict[str, CodedConcept]] = {
    # Not in pydicom's 3.0 dictionary; the codes are SNOMED CT's (checked against HL7's published
    # "COVID-19 SNOMED CT Diagnosis" value set and the C-CDA on FHIR pneumonia example). 840539006's
    # preferred term "Disease caused by severe acute respiratory syndrome coronavirus 2" has 66
    # characters, over Code Meaning's 64 (LO): its synonym "COVID-19" is the meaning.
    "covid 19": CodedConcept("840539006", "SCT", "COVID-19"),
    "pneumonia": CodedConcept("233604007", "SCT", "Pneumonia"),
    "nodule": _coded(codes.SCT.Nodule),  # 27925004
    # DICOM's own code (CID 6104 "Abnormal Opacity Finding or Feature"): SCT has none in the tables.
    "infiltration": _coded(codes.DCM.Infiltrate),  # 112121
    # On a chest radiograph "Effusion" and "Edema" are pleural and pulmonary; the dictionary's
    # "Effusion" (41699000) and "Edema" (79654002) are the general concepts.
    "effusion": _coded(codes.SCT.PleuralEffusion),  # 60046008
    "edema": _coded(codes.SCT.PulmonaryEdema),  # 19242006
}


def _private(label: str) -> CodedConcept:
    value = re.sub(r"[^A-Z0-9]+", "-", label.upper()).strip("-")[:16] or "UNNAMED"
    return CodedConcept(value, PRIVATE, label[:64])


def concept_for(label: str) -> CodedConcept:
    """A finding label as a code: FINDING_CODES, else the standard one if pydicom knows that name,
    else a private one."""
    known = FINDING_CODES.get(" ".join(re.findall(r"[a-z0-9]+", label.lower())))
    if known is not None:
        return known
    keyword = "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", label) if part)
    for scheme in (codes.SCT, codes.DCM):
        try:
            code = getattr(scheme, keyword)
        except AttributeError:
            continue
        return CodedConcept(code.value, code.scheme_designator, code.meaning)
    return _private(label)


def _presence(positive: bool) -> CodedConcept:
    code = codes.SCT.Present if positive else codes.SCT.Absent
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def _group(
    result: Result,
    source: Dataset,
    key: str,
    finding: CodedConcept,
    measurements: Sequence[Measurement],
    evaluations: Sequence[QualitativeEvaluation] = (),
) -> MeasurementsAndQualitativeEvaluations:
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=derived_uid(result, f"track/{key}"), identifier=key[:64]),
        finding_type=finding,
        algorithm_id=AlgorithmIdentification(
            name=result.provenance.model, version=result.provenance.model_version
        ),
        finding_sites=[FindingSite(codes.SCT.Lung)],
        measurements=list(measurements),
        qualitative_evaluations=list(evaluations) or None,
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )


def _measurement(name: CodedConcept, value: float, unit: CodedConcept) -> Measurement:
    return Measurement(name=name, value=float(value), unit=unit)


def _groups(result: Result, source: Dataset) -> list[MeasurementsAndQualitativeEvaluations]:
    probability = CodedConcept(codes.DCM.Probability.value, "DCM", codes.DCM.Probability.meaning)
    groups = []
    for finding in result.findings:
        concept = concept_for(finding.label)
        groups.append(
            _group(
                result,
                source,
                f"finding/{finding.label}",
                concept,
                [_measurement(probability, finding.score, NO_UNITS)],
                [QualitativeEvaluation(concept, _presence(finding.positive))],
            )
        )
    if result.abnormal is not None:
        # "Imaging result abnormal" is the reading's verdict, the triage level: a named finding or an
        # enlarged heart makes the image abnormal with the abnormality score itself below its point, and
        # "Absent" beside "Triage level: abnormal" would contradict it. The score is the measurement.
        abnormal = (
            result.triage in ("abnormal", "urgent") if result.triage is not None else result.abnormal.positive
        )
        evaluations = [QualitativeEvaluation(ABNORMAL, _presence(abnormal))] if abnormal is not None else []
        groups.append(
            _group(
                result,
                source,
                "abnormal",
                ABNORMAL,
                [_measurement(probability, result.abnormal.score, NO_UNITS)],
                evaluations,
            )
        )
    # Only the published (validated) measures: an unvalidated one is null in the result, absent here.
    severity = (
        [
            _measurement(name, value, SCORE_UNIT)
            for name, value in ((EXTENT, result.severity.extent), (OPACITY_DEGREE, result.severity.opacity))
            if value is not None
        ]
        if result.severity is not None
        else []
    )
    if severity:
        opacity = CodedConcept(codes.DCM.Opacity.value, "DCM", codes.DCM.Opacity.meaning)
        groups.append(_group(result, source, "severity", opacity, severity))
    if result.cardiac is not None:
        groups.append(
            _group(
                result,
                source,
                "cardiothoracic-ratio",
                CARDIOTHORACIC_RATIO,
                [_measurement(CARDIOTHORACIC_RATIO, result.cardiac.ratio, NO_UNITS)],
            )
        )
    if result.risk is not None:
        groups.append(
            _group(
                result,
                source,
                f"risk/{result.risk.method}",
                DETERIORATION,
                [_measurement(probability, result.risk.score, NO_UNITS)],
            )
        )
    return groups


def _qualitative(result: Result) -> ContainerContentItem:
    """TID 1500's root 'Qualitative Evaluations' container: triage level and the result's text."""
    container = ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    items: list[Dataset] = []
    if result.triage is not None:
        level = CodedConcept(result.triage.upper(), PRIVATE, result.triage)
        items.append(CodeContentItem(name=TRIAGE, value=level, relationship_type="CONTAINS"))
    impression = CodedConcept(codes.DCM.Impression.value, "DCM", codes.DCM.Impression.meaning)
    items.append(TextContentItem(name=impression, value=result.text, relationship_type="CONTAINS"))
    container.ContentSequence = DicomSequence(items)
    return container


def build_sr(result: Result, source: Dataset, *, manufacturer: str) -> ComprehensiveSR:
    """The SR for `result` of the image `source` (its header is enough). Raises DicomOutError."""
    device = result.provenance.device_uid
    if not device or not UID(device).is_valid:
        raise DicomOutError(f"the result names no valid device UID for the algorithm: {device!r}")
    try:
        observer = ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=device,
                name=result.device_id,
                manufacturer_name=manufacturer,
                model_name=f"{result.provenance.model} {result.provenance.model_version}",
            ),
        )
        report = MeasurementReport(
            observation_context=ObservationContext(observer_device_context=observer),
            procedure_reported=PLAIN_CHEST_XRAY,
            imaging_measurements=_groups(result, source),
        )
        report[0].ContentSequence.append(_qualitative(result))
        sr = ComprehensiveSR(
            evidence=[source],
            content=report[0],
            series_number=SR_SERIES_NUMBER,
            is_complete=True,
            is_final=False,  # an algorithm's output; nobody has verified it
            series_description=series_description("report"),
            coding_schemes=[
                CodingSchemeIdentificationItem(
                    designator=PRIVATE,
                    name="CXR appliance local codes",
                    responsible_organization="CXR appliance",
                )
            ],
            **common_kwargs(result, "sr", manufacturer),
        )
    except (ValueError, TypeError) as exc:
        raise DicomOutError(f"SR for image {result.image.image_id[:12]} refused: {exc}") from exc
    add_device_uid(sr, result)
    return sr
