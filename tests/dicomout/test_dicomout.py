"""SR and SC for real results of real DICOMs: written, read back with pydicom/highdicom, refused when invalid."""

from __future__ import annotations

import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from appliance.config import DicomOutConfig
from appliance.dicomout import DicomOutError
from appliance.dicomout.sr import PRIVATE, concept_for
from appliance.dicomout.writer import DicomOutWriter
from appliance.result import Result, Severity

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the test DICOMs' odd patient names


@pytest.fixture
def writer(tmp_path: Path) -> DicomOutWriter:
    return DicomOutWriter(DicomOutConfig(enabled=True, outbox=tmp_path / "dicom-out"))


def _presence_code(positive: bool) -> hd.sr.CodedConcept:
    code = codes.SCT.Present if positive else codes.SCT.Absent
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def by_kind(paths: list[Path]) -> dict[str, pydicom.Dataset]:
    return {p.name.split(".")[-2]: pydicom.dcmread(p) for p in paths}


def test_sr_is_a_tid1500_report_of_the_result(
    writer: DicomOutWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    for result, source_path in analyzed:
        source = pydicom.dcmread(source_path, stop_before_pixels=True)
        written = writer.write(result, source_path)
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
        severity = kinds[codes.DCM.Opacity.value]
        assert result.severity is not None and result.risk is not None
        values = {m.name.value: m.value for m in severity.get_measurements()}
        assert values == {"EXTENT": pytest.approx(result.severity.extent), "OPACITY": pytest.approx(2.0)}
        risk = kinds["DETERIORATION"]
        assert risk.get_measurements()[0].value == pytest.approx(result.risk.score)
        texts = [element.value for element in ds.iterall() if element.keyword == "TextValue"]
        assert result.text in texts and result.text.endswith("Not for diagnostic use.")


def test_sc_is_a_derived_overlay_of_the_source(
    writer: DicomOutWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    result, source_path = analyzed[0]
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    ds = by_kind(writer.write(result, source_path))["sc"]
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
    writer: DicomOutWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    result, source_path = analyzed[1]
    first = by_kind(writer.write(result, source_path))
    again = by_kind(writer.write(result, source_path))
    assert {k: d.SOPInstanceUID for k, d in first.items()} == {k: d.SOPInstanceUID for k, d in again.items()}
    other_model = result.model_copy(
        update={
            "message_id": "another-model-message",
            "provenance": result.provenance.model_copy(update={"device_uid": "2.25.987654321"}),
        }
    )
    changed = by_kind(writer.write(other_model, source_path))
    assert changed["sr"].DeviceUID == changed["sc"].DeviceUID == "2.25.987654321"
    assert changed["sr"].SOPInstanceUID != first["sr"].SOPInstanceUID


def test_highdicom_refuses_a_non_finite_measurement_and_nothing_is_written(
    writer: DicomOutWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    result, source_path = analyzed[0]
    broken = result.model_copy(update={"severity": Severity(extent=float("nan"), opacity=1.0)})
    with pytest.raises(DicomOutError, match="non-finite"):
        writer.write(broken, source_path)
    assert list(writer.config.outbox.iterdir()) == []
    assert writer.write_safely(broken, source_path) == []  # what the daemon calls: logged, not raised


def test_a_source_without_uids_is_refused_naming_the_file(
    writer: DicomOutWriter, analyzed: list[tuple[Result, Path]], tmp_path: Path
) -> None:
    result, source_path = analyzed[2]
    ds = pydicom.dcmread(source_path)
    del ds.StudyInstanceUID
    damaged = tmp_path / "damaged.dcm"
    ds.save_as(damaged)
    with pytest.raises(DicomOutError, match=r"damaged\.dcm.*lacks StudyInstanceUID"):
        writer.write(result, damaged)


def test_non_dicom_and_refused_results_get_no_dicom_objects(
    writer: DicomOutWriter, analyzed: list[tuple[Result, Path]]
) -> None:
    result, source_path = analyzed[0]
    png = result.model_copy(update={"image": result.image.model_copy(update={"format": "png"})})
    refused = result.model_copy(update={"status": "refused", "reason": "not a chest X-ray"})
    assert writer.write(png, source_path) == [] and writer.write(refused, source_path) == []


def test_finding_codes_come_from_the_dicom_dictionary_or_the_private_scheme() -> None:
    with warnings.catch_warnings():
        assert concept_for("Pleural effusion").scheme_designator == "SCT"
        assert concept_for("Pneumothorax").value == "36118008"
        assert concept_for("COVID-19").scheme_designator == PRIVATE
