"""Interpretation of raw outputs: refusal, triage, zones and text that traces to outputs."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.image import ImageMeta
from appliance.interpret.gate import gate_on_tags
from appliance.interpret.reading import read_outputs
from appliance.interpret.zones import describe_zones
from appliance.manifest import Manifest
from appliance.preprocess import Geometry
from appliance.result import Zone

SIZE = 64


def manifest() -> Manifest:
    return Manifest.model_validate(
        {
            "name": "full",
            "version": "1",
            "onnx": {"fp32": {"file": "m.onnx", "sha256": "0" * 64}},
            "input": {"name": "image", "height": SIZE, "width": SIZE},
            "outputs": [
                {
                    "name": "view",
                    "role": "view",
                    "activation": "softmax",
                    "labels": ["frontal", "lateral", "not_cxr"],
                    "refuse_labels": {"lateral": "lateral view", "not_cxr": "not a chest X-ray"},
                },
                {
                    "name": "find",
                    "role": "findings",
                    "activation": "softmax",
                    "labels": ["No Finding", "COVID-19", "Pneumonia"],
                    "normal_label": "No Finding",
                    "thresholds": {"COVID-19": 0.4, "Pneumonia": 0.4, "No Finding": 0.5},
                },
                {"name": "abn", "role": "abnormal", "activation": "sigmoid", "labels": ["abnormal"]},
                {
                    "name": "sev",
                    "role": "severity",
                    "labels": ["extent", "opacity"],
                    "ranges": {"extent": [0, 8], "opacity": [0, 6]},
                },
                {
                    "name": "risk",
                    "role": "risk",
                    "activation": "sigmoid",
                    "labels": ["adverse_outcome"],
                    "thresholds": {"adverse_outcome": 0.5},
                },
                {"name": "ood", "role": "ood", "labels": ["ood"], "thresholds": {"ood": 10.0}},
                {"name": "heat", "role": "heatmap"},
                {"name": "lungs", "role": "lung_mask", "activation": "sigmoid", "thresholds": {"lung": 0.5}},
            ],
            "triage": {"abnormal_threshold": 0.3, "urgent_threshold": 0.9, "urgent_extent": 6},
            "heatmap_label": "abnormal",
        }
    )


GEOMETRY = Geometry(SIZE, SIZE, 0, 0, SIZE, SIZE)


def outputs(
    view: list[float],
    abn_logit: float,
    extent: float = 5.0,
    ood: float = 2.0,
    find: tuple[float, float, float] = (0.0, 2.0, 0.5),
) -> dict[str, np.ndarray]:
    lungs = np.full((16, 16), -9.0, np.float32)
    lungs[2:14, 1:7] = 9.0  # patient's right lung (image left)
    lungs[2:14, 9:15] = 9.0
    heat = np.zeros((16, 16), np.float32)
    heat[10:14, 1:7] = 1.0  # right lower zone hot
    heat[10:14, 9:15] = 0.9  # left lower zone hot
    return {
        "view": np.array(view, np.float32),
        "find": np.array(find, np.float32),
        "abn": np.array([abn_logit], np.float32),
        "sev": np.array([extent, 3.2], np.float32),
        "risk": np.array([-1.0], np.float32),
        "ood": np.array([ood], np.float32),
        "heat": heat,
        "lungs": lungs,
    }


META = ImageMeta(format="png")


def test_abnormal_image_gets_zones_severity_finding_and_traceable_text() -> None:
    reading = read_outputs(
        manifest(),
        outputs([5, 0, 0], abn_logit=1.0),
        GEOMETRY,
        ImageMeta(format="dicom", view_position="AP"),
        with_heatmap=True,
    )
    assert reading.status == "ok" and reading.triage == "abnormal"
    assert {(z.side, z.level) for z in reading.zones if z.positive} == {("right", "lower"), ("left", "lower")}
    text = " ".join(s.text for s in reading.sentences)
    assert text.startswith(
        "Frontal AP view. Possible COVID-19 (0.74). Model attention highest in both lower zones."
        " Lung involvement: extent 5.0 of 8, opacity 3.2 of 6."
    )
    assert "Pneumonia" not in text and text.endswith("Not for diagnostic use.")
    # No heart mask in this model: said once, not silently left out.
    assert "Not assessed: heart size." in text
    sources = [s.source for s in reading.sentences]
    assert sources == [
        "dicom.ViewPosition",
        "findings.COVID-19",
        "zones",
        "severity",
        "risk",
        "manifest.not_assessed",
        "disclaimer",
    ]
    assert reading.heatmap is not None and reading.heatmap.width == 64


def test_a_positive_finding_makes_the_reading_abnormal_even_below_the_abnormal_point() -> None:
    reading = read_outputs(manifest(), outputs([5, 0, 0], abn_logit=-4.0), GEOMETRY, META, with_heatmap=False)
    assert reading.triage == "abnormal"
    assert not any("No abnormality" in s.text for s in reading.sentences)
    assert any(s.text.startswith("Possible COVID-19") for s in reading.sentences)


def test_urgent_by_extent_and_by_score() -> None:
    assert (
        read_outputs(
            manifest(), outputs([5, 0, 0], 1.0, extent=7.0), GEOMETRY, META, with_heatmap=False
        ).triage
        == "urgent"
    )
    assert (
        read_outputs(manifest(), outputs([5, 0, 0], 4.0), GEOMETRY, META, with_heatmap=False).triage
        == "urgent"
    )


def test_normal_image_says_so_and_names_no_zone() -> None:
    quiet = outputs([5, 0, 0], abn_logit=-4.0, find=(3.0, 0.0, 0.0))
    reading = read_outputs(manifest(), quiet, GEOMETRY, META, with_heatmap=False)
    assert reading.triage == "normal"
    assert "No abnormality detected above the operating point" in reading.sentences[1].text
    assert not any("zone" in s.text for s in reading.sentences)
    # Severity and zones describe an abnormal image: a normal reading publishes neither.
    assert reading.severity is None and reading.zones == [] and reading.heatmap is None


@pytest.mark.parametrize(
    ("view", "ood", "reason"),
    [
        ([0, 6, 0], 2.0, "lateral view"),
        ([0, 0, 6], 2.0, "not a chest X-ray"),
        ([6, 0, 0], 50.0, "not a chest X-ray"),
    ],
)
def test_refusals_say_why(view: list[float], ood: float, reason: str) -> None:
    reading = read_outputs(manifest(), outputs(view, 1.0, ood=ood), GEOMETRY, META, with_heatmap=True)
    assert reading.status == "refused" and reading.reason == reason and reading.triage is None
    assert reading.sentences[0].text.startswith(f"Not read: {reason}")


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        (ImageMeta(format="dicom", modality="CT"), "not a chest X-ray"),
        (ImageMeta(format="dicom", modality="DX", view_position="LL"), "lateral view"),
        (ImageMeta(format="dicom", modality="DX", view_position="RLO"), "oblique view"),
        (ImageMeta(format="dicom", modality="DX", view_position="lao"), "oblique view"),
        (ImageMeta(format="dicom", modality="CR", body_part="HAND"), "not a chest X-ray"),
    ],
)
def test_tag_gate(meta: ImageMeta, reason: str) -> None:
    refusal = gate_on_tags(meta)
    assert refusal is not None and refusal.reason == reason


def test_tag_gate_passes_a_chest_pa() -> None:
    assert (
        gate_on_tags(ImageMeta(format="dicom", modality="CR", view_position="PA", body_part="CHEST")) is None
    )


@pytest.mark.parametrize(
    ("positive", "expected"),
    [
        ({("left", "middle"), ("left", "upper")}, "the left middle and upper zones"),
        (
            {("right", "lower"), ("left", "lower"), ("left", "middle")},
            "both lower zones and the left middle zone",
        ),
        ({("right", "upper")}, "the right upper zone"),
        (set(), None),
    ],
)
def test_zone_phrases(positive: set[tuple[str, str]], expected: str | None) -> None:
    zones = [
        Zone(
            side=side,
            level=level,
            involvement=0.5 if (side, level) in positive else 0.0,
            positive=(side, level) in positive,
        )
        for side in ("right", "left")
        for level in ("upper", "middle", "lower")
    ]
    assert describe_zones(zones) == expected


def restricted(**published: list[str]) -> Manifest:
    """The test manifest with `published:` set on the outputs of the given roles."""
    content = manifest().model_dump(mode="json")
    for output in content["outputs"]:
        if output["role"] in published:
            output["published"] = published[output["role"]]
    return Manifest.model_validate(content)


def test_an_unpublished_finding_is_neither_in_the_payload_nor_in_the_text() -> None:
    reading = read_outputs(
        restricted(findings=["Pneumonia"]),
        outputs([5, 0, 0], abn_logit=1.0),
        GEOMETRY,
        META,
        with_heatmap=True,
    )
    assert [f.label for f in reading.findings] == ["Pneumonia"]
    text = " ".join(s.text for s in reading.sentences)
    assert "Possible COVID-19" not in text  # the highest score, but not validated
    assert "Not assessed: COVID-19, heart size." in text


def test_unvalidated_localisation_and_measures_are_not_published() -> None:
    reading = read_outputs(
        restricted(heatmap=[], severity=["opacity"], risk=[]),
        outputs([5, 0, 0], abn_logit=1.0),
        GEOMETRY,
        META,
        with_heatmap=True,
    )
    assert reading.triage == "abnormal"
    assert reading.zones == [] and reading.heatmap is None and reading.risk is None
    assert (
        reading.severity is not None and reading.severity.extent is None and reading.severity.opacity == 3.2
    )
    text = " ".join(s.text for s in reading.sentences)
    assert "zone" not in text and "extent" not in text and "risk" not in text
    assert "Lung involvement: opacity 3.2 of 6." in text
    assert "localisation" in text


def test_the_full_heatmap_is_kept_whatever_mqtt_publishes_and_only_where_it_may_be_shown() -> None:
    """The DICOM SC draws `heat`: no MQTT option changes it, and it follows the publication rule."""
    sick = outputs([5, 0, 0], abn_logit=1.0)
    with_png = read_outputs(manifest(), sick, GEOMETRY, META, with_heatmap=True)
    without_png = read_outputs(manifest(), sick, GEOMETRY, META, with_heatmap=False)
    assert with_png.heatmap is not None and without_png.heatmap is None
    assert with_png.heat is not None and without_png.heat is not None
    np.testing.assert_array_equal(with_png.heat, without_png.heat)
    assert with_png.heat_label == without_png.heat_label == with_png.heatmap.label
    assert "heat" not in with_png.payload_fields() and "heat_label" not in with_png.payload_fields()
    quiet = outputs([5, 0, 0], abn_logit=-4.0, find=(3.0, 0.0, 0.0))
    assert read_outputs(manifest(), quiet, GEOMETRY, META, with_heatmap=True).heat is None  # normal
    unvalidated = restricted(heatmap=[], severity=["opacity"], risk=[])
    assert read_outputs(unvalidated, sick, GEOMETRY, META, with_heatmap=True).heat is None
