"""SR and SC for real results of real DICOMs: written, read back with pydicom/highdicom, refused when invalid."""

from __future__ import annotations

import logging
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from appliance.config import DicomOutConfig
from appliance.dicomout import DicomOutError
from appliance.dicomout.sr import ABNORMAL, PRIVATE, build_sr, concept_for
from appliance.dicomout.writer import DicomOutWriter, repaired_age
from appliance.result import Finding, Result, Score, Severity
from tests.dicomout.conftest import MakeJob
from testsupport.dciodvfy import DCIODVFY, MISSING, assert_valid, errors


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[DicomOutWriter]:
    """A writer whose every SR and SC must pass dciodvfy (checked when the test is done)."""
    made = DicomOutWriter(DicomOutConfig(enabled=True, outbox=tmp_path / "dicom-out"))
    yield made
    written = sorted(made.config.outbox.glob("*.dcm"))
    if written and DCIODVFY is not None:  # without it, test_dciodvfy_finds_no_error says why it skips
        assert_valid(written)


def a_source_like(source_path: Path, folder: Path, **changes: object) -> Path:
    """A copy of a real DICOM with some header values changed (None: removed)."""
    ds = pydicom.dcmread(source_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid values are what these sources are made for
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / source_path.name
    ds.save_as(path)
    return path


def _presence_code(positive: bool) -> hd.sr.CodedConcept:
    code = codes.SCT.Present if positive else codes.SCT.Absent
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def by_kind(paths: list[Path]) -> dict[str, pydicom.Dataset]:
    return {p.name.split(".")[-2]: pydicom.dcmread(p) for p in paths}


def test_sr_is_a_tid1500_report_of_the_result(
    dicom_job: MakeJob, writer: DicomOutWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    for result, source_path in analyzed:
        source = pydicom.dcmread(source_path, stop_before_pixels=True)
        written = writer.write(dicom_job(result, source_path))
        assert [p.name for p in written] == [
            f"{result.image.image_id}.sr.dcm",
            f"{result.image.image_id}.sc.dcm",
        ]
        ds = by_kind(written)["sr"]
        assert ds.SOPClassUID == ComprehensiveSRStorage
        assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        assert (ds.StudyInstanceUID, ds.PatientID) == (source.StudyInstanceUID, source.PatientID)
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert "Not for diagnostic use" in ds.SeriesDescription
        assert ds.DeviceUID == result.provenance.device_uid
        assert ds.ManufacturerModelName == result.provenance.model
        assert result.provenance.model_version in ds.SoftwareVersions
        assert (ds.CompletionFlag, ds.VerificationFlag) == ("COMPLETE", "UNVERIFIED")

        report = hd.sr.ComprehensiveSR.from_dataset(ds).content
        assert isinstance(report, hd.sr.MeasurementReport)
        observer = report.get_observer_contexts()[0]
        assert observer.observer_identifying_attributes[0].value == result.provenance.device_uid
        groups = report.get_image_measurement_groups(referenced_sop_instance_uid=source.SOPInstanceUID)
        assert len(groups) == len(result.findings) + 3  # + abnormal, severity, risk
        for finding in result.findings:
            (group,) = report.get_image_measurement_groups(finding_type=concept_for(finding.label))
            (probability,) = group.get_measurements()
            assert probability.value == pytest.approx(finding.score)
            (presence,) = group.get_qualitative_evaluations()
            assert presence.value == _presence_code(finding.positive)
            assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
        kinds = {g.finding_type.value if g.finding_type else None: g for g in groups}
        # "Imaging result abnormal" is the reading's verdict (found by a review run: "Absent" beside
        # "Triage level: abnormal" when a finding, not the abnormality score, made the image abnormal).
        (verdict,) = kinds[ABNORMAL.value].get_qualitative_evaluations()
        assert verdict.value == _presence_code(result.triage in ("abnormal", "urgent"))
        severity = kinds[codes.DCM.Opacity.value]
        assert result.severity is not None and result.risk is not None
        values = {m.name.value: m.value for m in severity.get_measurements()}
        assert values == {"EXTENT": pytest.approx(result.severity.extent), "OPACITY": pytest.approx(2.0)}
        risk = kinds["DETERIORATION"]
        assert risk.get_measurements()[0].value == pytest.approx(result.risk.score)
        texts = [element.value for element in ds.iterall() if element.keyword == "TextValue"]
        assert result.text in texts and result.text.endswith("Not for diagnostic use.")


def test_sc_is_a_derived_overlay_of_the_source(
    dicom_job: MakeJob, writer: DicomOutWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    result, source_path = analyzed[0]
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    ds = by_kind(writer.write(dicom_job(result, source_path)))["sc"]
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert "Not for diagnostic use" in ds.SeriesDescription
    assert ds.DeviceUID == result.provenance.device_uid
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (ds.StudyInstanceUID, ds.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert ds.BurnedInAnnotation == "YES" and "PixelSpacing" not in ds
    rgb = ds.pixel_array.astype(np.int16)  # pydicom returns RGB for the JPEG's YBR
    assert rgb.shape == (source.Rows, source.Columns, 3)
    colour = rgb[..., 0] - rgb[..., 2]  # red/yellow minus blue: zero on grey pixels
    h, w = colour.shape
    hot = colour[int(h * 0.45) : int(h * 0.50), int(w * 0.26) : int(w * 0.30)].mean()  # heatmap peak
    cold = colour[int(h * 0.45) : int(h * 0.50), int(w * 0.70) : int(w * 0.74)].mean()  # patient's left
    assert hot > 60 and abs(cold) < 6, (hot, cold)


def test_writing_again_gives_the_same_objects_and_a_new_model_a_new_device_uid(
    dicom_job: MakeJob, writer: DicomOutWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    result, source_path = analyzed[1]
    first = by_kind(writer.write(dicom_job(result, source_path)))
    again = by_kind(writer.write(dicom_job(result, source_path)))
    assert {k: d.SOPInstanceUID for k, d in first.items()} == {k: d.SOPInstanceUID for k, d in again.items()}
    other_model = result.model_copy(
        update={
            "message_id": "another-model-message",
            "provenance": result.provenance.model_copy(update={"device_uid": "2.25.987654321"}),
        }
    )
    changed = by_kind(writer.write(dicom_job(other_model, source_path)))
    assert changed["sr"].DeviceUID == changed["sc"].DeviceUID == "2.25.987654321"
    assert changed["sr"].SOPInstanceUID != first["sr"].SOPInstanceUID


def test_highdicom_refuses_a_non_finite_measurement_and_nothing_is_written(
    dicom_job: MakeJob, writer: DicomOutWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    result, source_path = analyzed[0]
    broken = result.model_copy(update={"severity": Severity(extent=float("nan"), opacity=1.0)})
    with pytest.raises(DicomOutError, match="non-finite"):
        writer.write(dicom_job(broken, source_path))
    assert list(writer.config.outbox.iterdir()) == []
    assert writer.write_safely(dicom_job(broken, source_path)) == []  # logged, not raised


def test_a_source_without_uids_is_refused_naming_the_file(
    dicom_job: MakeJob, writer: DicomOutWriter, analyzed: list[tuple[Result, Path]], tmp_path: Path
) -> None:
    result, source_path = analyzed[2]
    ds = pydicom.dcmread(source_path)
    del ds.StudyInstanceUID
    damaged = tmp_path / "damaged.dcm"
    ds.save_as(damaged)
    with pytest.raises(DicomOutError, match=r"damaged\.dcm.*lacks StudyInstanceUID"):
        writer.write(dicom_job(result, damaged))


def test_non_dicom_and_refused_results_get_no_dicom_objects(
    dicom_job: MakeJob, writer: DicomOutWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    result, source_path = analyzed[0]
    png = result.model_copy(update={"image": result.image.model_copy(update={"format": "png"})})
    refused = result.model_copy(update={"status": "refused", "reason": "not a chest X-ray"})
    assert (
        writer.write(dicom_job(png, source_path)) == []
        and writer.write(dicom_job(refused, source_path)) == []
    )


@pytest.mark.parametrize(
    ("label", "scheme", "value", "meaning"),
    [
        ("COVID-19", "SCT", "840539006", "COVID-19"),
        ("Pneumonia", "SCT", "233604007", "Pneumonia"),
        ("Nodule", "SCT", codes.SCT.Nodule.value, "Nodule"),
        ("Infiltration", "DCM", codes.DCM.Infiltrate.value, "Infiltrate"),
        ("Effusion", "SCT", codes.SCT.PleuralEffusion.value, "Pleural effusion"),
        ("Pleural effusion", "SCT", codes.SCT.PleuralEffusion.value, "Pleural effusion"),
        ("Edema", "SCT", codes.SCT.PulmonaryEdema.value, "Pulmonary edema"),
        ("Pneumothorax", "SCT", "36118008", "Pneumothorax"),
        ("Cardiomegaly", "SCT", codes.SCT.Cardiomegaly.value, "Cardiomegaly"),
        # No code in pydicom's/highdicom's tables (only the narrower "Plate-like atelectasis"): private.
        ("Atelectasis", PRIVATE, "ATELECTASIS", "Atelectasis"),
        ("Consolidation", PRIVATE, "CONSOLIDATION", "Consolidation"),
    ],
)
def test_finding_codes_are_standard_where_one_exists(
    label: str, scheme: str, value: str, meaning: str
) -> None:
    concept = concept_for(label)
    assert (concept.scheme_designator, concept.value, concept.meaning) == (scheme, value, meaning)


def test_the_dictionary_codes_used_are_the_ones_named() -> None:
    """The codes taken from pydicom's dictionary, by value: a renamed or changed entry shows here."""
    assert (codes.SCT.Nodule.value, codes.SCT.Nodule.meaning) == ("27925004", "Nodule")
    assert (codes.DCM.Infiltrate.value, codes.DCM.Infiltrate.meaning) == ("112121", "Infiltrate")
    assert codes.SCT.PleuralEffusion.value == "60046008" and codes.SCT.PulmonaryEdema.value == "19242006"
    assert (ABNORMAL.scheme_designator, ABNORMAL.value, ABNORMAL.meaning) == (
        "SCT",
        "408574004",
        "Imaging result abnormal",
    )


def test_text_with_characters_beyond_latin_1_round_trips(
    dicom_job: MakeJob, writer: DicomOutWriter, analyzed: list[tuple[Result, Path]], tmp_path: Path
) -> None:
    result, source_path = analyzed[0]
    assert pydicom.dcmread(source_path, stop_before_pixels=True).SpecificCharacterSet == "ISO_IR 100"
    source = a_source_like(source_path, tmp_path / "source", PatientName="Müller^Jörg")
    text = "Opacity right mid zone → lower zone (≥ 2 zones, 50 %). Not for diagnostic use."
    arrows = result.model_copy(update={"text": text})
    written = by_kind(writer.write(dicom_job(arrows, source)))
    for ds in written.values():
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == "Müller^Jörg"  # from a Latin-1 source, carried into UTF-8
    texts = [element.value for element in written["sr"].iterall() if element.keyword == "TextValue"]
    assert text in texts


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("062Y", "062Y"),
        ("45", None),  # no unit: years? months? left out
        ("045Y ", "045Y"),
        ("45y", "045Y"),
        ("3 W", "003W"),
        ("0045Y", "045Y"),
        ("045YX", None),
        ("45 years", None),
        ("1234Y", None),
        ("", ""),
    ],
)
def test_patient_age_in_the_sr_is_repaired_or_left_out(
    dicom_job: MakeJob,
    writer: DicomOutWriter,
    analyzed: list[tuple[Result, Path]],
    tmp_path: Path,
    given: str,
    expected: str | None,
) -> None:
    result, source_path = analyzed[0]
    source = a_source_like(source_path, tmp_path / "source", PatientAge=given)
    sr = by_kind(writer.write(dicom_job(result, source)))["sr"]
    assert sr.get("PatientAge") == expected
    assert pydicom.dcmread(source).PatientAge == given.strip()  # the source file is left as it was


@pytest.mark.parametrize(
    ("given", "expected"),
    [("1950-01-01", "19500101"), ("1950.01.01", "19500101"), ("unknown", ""), ("19500101", "19500101")],
)
def test_a_birth_date_that_is_not_a_dicom_date_does_not_cost_the_sr(
    dicom_job: MakeJob,
    writer: DicomOutWriter,
    analyzed: list[tuple[Result, Path]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    given: str,
    expected: str,
) -> None:
    """Found by a review run: '1950-01-01' made highdicom refuse the SR (no SR, no SC), and the error
    logged quoted the birth date."""
    result, source_path = analyzed[0]
    source = a_source_like(source_path, tmp_path / "source", PatientBirthDate=given)
    with caplog.at_level(logging.INFO):
        sr = by_kind(writer.write(dicom_job(result, source)))["sr"]
    assert sr.PatientBirthDate == expected
    assert given not in caplog.text or given == expected


def test_repaired_age_takes_only_strings_with_a_unit() -> None:
    assert [repaired_age(v) for v in ("7D", "12m", "100Y", "045Y")] == ["007D", "012M", "100Y", "045Y"]
    assert [repaired_age(v) for v in ("45", "Y", "-5Y", "45Y6M", None, 45)] == [None] * 6


def test_sc_carries_the_body_part_so_laterality_is_not_required(
    dicom_job: MakeJob, writer: DicomOutWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    for result, source_path in analyzed:
        source = pydicom.dcmread(source_path, stop_before_pixels=True)
        sc = by_kind(writer.write(dicom_job(result, source_path)))["sc"]
        assert sc.BodyPartExamined == source.get("BodyPartExamined", "CHEST") == "CHEST"
        assert sc.LossyImageCompressionMethod == "ISO_10918_1"
    assert "BodyPartExamined" not in pydicom.dcmread(analyzed[1][1], stop_before_pixels=True)


def test_warnings_from_highdicom_go_to_the_log_not_to_stderr(
    dicom_job: MakeJob,
    writer: DicomOutWriter,
    analyzed: list[tuple[Result, Path]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    result, source_path = analyzed[1]  # its Patient's Name "Covid0000" has one component
    with warnings.catch_warnings(), caplog.at_level(logging.DEBUG, logger="appliance.dicomout.writer"):
        warnings.simplefilter("error")  # a warning that escaped would raise here
        writer.write(dicom_job(result, source_path))
    said = [r for r in caplog.records if result.image.image_id[:12] in r.getMessage()]
    # The text quotes the patient's name: at debug level only; the default level says a warning came.
    quoting = [r for r in said if "unlikely to represent the intended person name" in r.getMessage()]
    assert (
        len(quoting) == 1 and quoting[0].levelno == logging.DEBUG and "Covid0000" in quoting[0].getMessage()
    )
    assert not [r for r in said if r.levelno >= logging.INFO and "Covid0000" in r.getMessage()]
    assert any(r.levelno == logging.INFO and "UserWarning" in r.getMessage() for r in said)


def test_dciodvfy_finds_no_error_in_any_sr_or_sc(
    dicom_job: MakeJob, writer: DicomOutWriter, analyzed: list[tuple[Result, Path]], tmp_path: Path
) -> None:
    if DCIODVFY is None:
        pytest.skip(MISSING)
    written = [
        path for result, source_path in analyzed for path in writer.write(dicom_job(result, source_path))
    ]
    assert len(written) == 2 * len(analyzed)
    assert_valid(written)
    # The validator does see errors: the SR as it was before Patient's Age was checked.
    broken = pydicom.dcmread(written[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        broken.PatientAge = "62"
        broken.save_as(tmp_path / "broken.sr.dcm")
    assert any("Patient's Age" in line for line in errors(tmp_path / "broken.sr.dcm"))
    assert subprocess.run([DCIODVFY, str(written[0])], capture_output=True, check=False).returncode == 0


@pytest.mark.parametrize(("triage", "present"), [("abnormal", True), ("urgent", True), ("normal", False)])
def test_imaging_result_abnormal_is_the_triage_verdict(
    analyzed: list[tuple[Result, Path]], triage: str, present: bool
) -> None:
    """A finding above its point makes the image abnormal with the abnormality score below its own."""
    result, source_path = analyzed[0]
    result = result.model_copy(
        update={
            "triage": triage,
            "abnormal": Score(score=0.3, threshold=0.7157, positive=False),
            "findings": [Finding(label="COVID-19", score=0.9, threshold=0.5, positive=triage != "normal")],
        }
    )
    sr = build_sr(result, pydicom.dcmread(source_path, stop_before_pixels=True), manufacturer="test")
    report = hd.sr.ComprehensiveSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    (group,) = report.get_image_measurement_groups(finding_type=ABNORMAL)
    (verdict,) = group.get_qualitative_evaluations()
    assert verdict.value == _presence_code(present)
