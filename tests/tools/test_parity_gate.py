"""The parity gate's rule (tools/engines/parity_gate.py and its parity_* modules, docs/parity.md) on small
synthetic score arrays."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from appliance.manifest import Manifest
from tools.engines import parity_gate, parity_scores
from tools.engines.parity_accuracy import AUC_DELTA, Truth
from tools.engines.parity_noise import ReadingVariants, measure_noise
from tools.engines.parity_report import markdown
from tools.training import dataset

N = 400


def manifest(**triage: Any) -> Manifest:
    return Manifest.model_validate(
        {
            "name": "synthetic",
            "version": "0",
            "onnx": {"fp32": {"file": "model.onnx", "sha256": "0"}},
            "input": {"name": "image", "height": 8, "width": 8},
            "outputs": [
                {
                    "name": "finding_logits",
                    "role": "findings",
                    "activation": "sigmoid",
                    "labels": ["COVID-19", "Pneumonia"],
                    "thresholds": {"COVID-19": 0.5, "Pneumonia": 0.5},
                    "published": ["COVID-19"],
                },
                {
                    "name": "severity",
                    "role": "severity",
                    "labels": ["extent"],
                    "ranges": {"extent": [0.0, 8.0]},
                    "published": ["extent"],
                },
                {
                    "name": "view_logits",
                    "role": "view",
                    "activation": "softmax",
                    "labels": ["frontal", "lateral"],
                },
                {"name": "ood_score", "role": "ood", "labels": ["ood"], "thresholds": {"ood": 2.0}},
            ],
            "triage": {"urgent_extent": 6.0, **triage},
        }
    )


def record(i: int, covid: int) -> dataset.Record:
    labels = [dataset.UNKNOWN] * len(dataset.FINDING_LABELS)
    labels[dataset.FINDING_LABELS.index("COVID-19")] = covid
    return dataset.Record(
        file=f"{i}.png",
        patient_id=str(i),
        modality="X-ray",
        view=dataset.VIEW_FRONTAL,
        finding=dataset.UNKNOWN,
        abnormal=dataset.UNKNOWN,
        extent=float(i % 8) if i < 40 else math.nan,
        opacity=math.nan,
        adverse=dataset.UNKNOWN,
        mask_file="",
        finding_name="COVID-19" if covid else "No Finding",
        labels=tuple(labels),
    )


@pytest.fixture
def reference() -> tuple[dict[str, np.ndarray], Truth]:
    rng = np.random.default_rng(0)
    covid = (np.arange(N) % 2).astype(int)
    logits = np.stack([covid * 2.0 - 1.0 + rng.normal(0, 1.0, N), rng.normal(0, 2, N)], axis=1)
    logits[0, 0] = 0.05  # an image just above the COVID-19 operating point (logit 0)
    logits[1, 0] = 3.0  # one far above it
    outputs = {
        "finding_logits": logits,
        "severity": np.arange(N, dtype=np.float64)[:, None] % 8,
        "view_logits": np.stack([np.full(N, 3.0), np.zeros(N)], axis=1),
        "ood_score": np.full((N, 1), 1.0),
    }
    truth = Truth([record(i, int(c)) for i, c in enumerate(covid)], [None] * N, [None] * N)
    return outputs, truth


def bands(band: float = 0.2, mean: float = 0.1, p99: float | None = None) -> dict[str, Any]:
    """Noise as measure_noise gives it, measured on every image (the paired comparison uses them all):
    `band` is the largest reading |Δ| (the flip band), `p99` and `mean` bound the deviation."""
    keys = ["findings.COVID-19", "findings.Pneumonia", "severity.extent", "view", "ood.ood"]
    limit = band if p99 is None else p99
    return {
        "bands": {k: {"band": band, "p99": limit, "mean": mean, "source": "decode", "n": N} for k in keys},
        "band_rows": list(range(N)),
    }


def copy(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in outputs.items()}


def row(report: dict[str, Any], key: str) -> dict[str, Any]:
    return next(r for r in report["scores"] if r["key"] == key)


def test_identical_candidate_passes_with_zero_deviation(
    reference: tuple[dict[str, np.ndarray], Truth],
) -> None:
    outputs, truth = reference
    report = parity_gate.judge(manifest(), outputs, copy(outputs), bands(), truth)
    assert report["passed"], report["checks"]
    covid = row(report, "findings.COVID-19")
    assert covid["max_abs"] == 0 and covid["accuracy"]["delta"] == 0
    assert covid["points"][0]["inside_band"] == covid["points"][0]["outside_band"] == 0


def test_flip_inside_the_band_is_counted_not_failed(reference: tuple[dict[str, np.ndarray], Truth]) -> None:
    outputs, truth = reference
    cand = copy(outputs)
    cand["finding_logits"][0, 0] = -0.05  # 0.05 above the point -> 0.05 below: within the 0.2 band
    report = parity_gate.judge(manifest(), outputs, cand, bands(), truth)
    point = row(report, "findings.COVID-19")["points"][0]
    assert (point["inside_band"], point["outside_band"]) == (1, 0)
    assert report["passed"], [c for c in report["checks"] if not c["ok"]]


def test_flip_outside_the_band_fails(reference: tuple[dict[str, np.ndarray], Truth]) -> None:
    outputs, truth = reference
    cand = copy(outputs)
    cand["finding_logits"][1, 0] = -0.1  # FP32 logit 3.0: far outside the band, now below the point
    report = parity_gate.judge(manifest(), outputs, cand, bands(band=0.2, mean=1.0), truth)
    point = row(report, "findings.COVID-19")["points"][0]
    assert (point["inside_band"], point["outside_band"]) == (0, 1)
    assert not report["passed"]
    failed = {c["check"] for c in report["checks"] if not c["ok"]}
    assert "findings.COVID-19: flips outside the band at COVID-19" in failed
    # A wider band (noisier reading) turns the same flip into a counted in-band flip.
    wide = parity_gate.judge(manifest(), outputs, cand, bands(band=3.5, mean=1.0), truth)
    assert row(wide, "findings.COVID-19")["points"][0]["inside_band"] == 1


def test_unpublished_label_is_reported_but_not_gated(reference: tuple[dict[str, np.ndarray], Truth]) -> None:
    outputs, truth = reference
    cand = copy(outputs)
    cand["finding_logits"][:, 1] += 5.0  # Pneumonia is not published
    report = parity_gate.judge(manifest(), outputs, cand, bands(), truth)
    assert report["passed"]
    assert not row(report, "findings.Pneumonia")["gated"]
    assert any("Pneumonia" in c["check"] and not c["ok"] for c in report["reported_only"])


def test_auc_delta_over_the_limit_fails(reference: tuple[dict[str, np.ndarray], Truth]) -> None:
    outputs, truth = reference
    cand = copy(outputs)
    rng = np.random.default_rng(1)
    cand["finding_logits"][:, 0] += rng.normal(0, 1.5, N)  # reorders many positives and negatives
    report = parity_gate.judge(manifest(), outputs, cand, bands(band=10, mean=10), truth)
    acc = row(report, "findings.COVID-19")["accuracy"]
    assert acc["metric"] == "AUC" and acc["n"] == N and acc["delta"] > AUC_DELTA
    assert not report["passed"]


def test_deviation_bound_p99_and_mean(reference: tuple[dict[str, np.ndarray], Truth]) -> None:
    outputs, truth = reference
    cand = copy(outputs)
    cand["finding_logits"][:, 0] += np.where(np.arange(N) % 50 == 0, 0.3, 0.0)  # 2 % of images move 0.3
    report = parity_gate.judge(manifest(), outputs, cand, bands(band=0.2, mean=0.1), truth)
    covid = row(report, "findings.COVID-19")
    assert covid["p99_abs"] == pytest.approx(0.3) and covid["mean_abs"] == pytest.approx(0.006)
    failed = {c["check"] for c in report["checks"] if not c["ok"]}
    assert "findings.COVID-19: p99 |Δ| <= reading noise p99 (same images)" in failed
    assert "findings.COVID-19: mean |Δ| <= reading noise mean (same images)" not in failed
    within = parity_gate.judge(manifest(), outputs, cand, bands(band=0.35, mean=0.1), truth)
    assert "findings.COVID-19: p99 |Δ| <= reading noise p99 (same images)" not in {
        c["check"] for c in within["checks"] if not c["ok"]
    }


def test_severity_mae_limit_scales_with_the_range(reference: tuple[dict[str, np.ndarray], Truth]) -> None:
    outputs, truth = reference
    cand = copy(outputs)
    cand["severity"] = cand["severity"] + 0.05  # labels equal the fp32 value: MAE 0 -> 0.05 > 0.005 x 8
    report = parity_gate.judge(manifest(), outputs, cand, bands(band=1, mean=1), truth)
    acc = row(report, "severity.extent")["accuracy"]
    assert acc["metric"] == "MAE" and acc["n"] == 40 and acc["limit"] == pytest.approx(0.04)
    assert acc["delta"] == pytest.approx(0.05) and not report["passed"]


def test_urgent_extent_operating_point_and_strict_ood(reference: tuple[dict[str, np.ndarray], Truth]) -> None:
    outputs, truth = reference
    scores = {s.key: s for s in parity_scores.scores(manifest())}
    assert [p.name for p in scores["severity.extent"].points] == ["urgent"]
    assert scores["ood.ood"].points[0].strict
    assert scores["findings.COVID-19"].points[0].threshold == pytest.approx(0.0)  # logit(0.5)
    cand = copy(outputs)
    cand["ood_score"][:5] = 2.0  # exactly at the threshold: "> 2" stays not refused
    report = parity_gate.judge(manifest(), outputs, cand, bands(band=5, mean=5), truth)
    assert row(report, "ood.ood")["points"][0]["inside_band"] == 0


def test_view_margin_flip(reference: tuple[dict[str, np.ndarray], Truth]) -> None:
    outputs, truth = reference
    cand = copy(outputs)
    cand["view_logits"][7] = [0.0, 3.0]  # margin 3 -> -3: a flip far outside a 0.2 band
    report = parity_gate.judge(manifest(), outputs, cand, bands(band=0.2, mean=1), truth)
    view = row(report, "view")
    assert view["points"][0]["outside_band"] == 1 and view["max_abs"] == pytest.approx(6.0)
    assert not report["passed"]


def test_band_and_bounds_come_from_the_measured_reading_noise() -> None:
    m = manifest()
    rng = np.random.default_rng(2)
    reference = {
        "finding_logits": rng.normal(0, 1, (N, 2)),
        "severity": rng.uniform(0, 8, (N, 1)),
        "view_logits": rng.normal(0, 1, (N, 2)),
        "ood_score": rng.uniform(0, 3, (N, 1)),
    }
    shift = np.abs(rng.normal(0, 0.1, N))

    def run_shifted(x: np.ndarray) -> dict[str, np.ndarray]:
        rows = x[:, 0].astype(int)  # the "tensors" carry their row index
        out = {k: v[rows].copy() for k, v in reference.items()}
        out["finding_logits"][:, 0] += shift[rows]
        return out

    def same(x: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[x[:, 0].astype(int)].copy() for k, v in reference.items()}

    index = np.arange(N, dtype=np.float64)[:, None]
    differ = np.arange(0, N, 2)
    variants = ReadingVariants(index[differ], differ, index)
    noise = measure_noise(m, index, reference, variants, run_shifted, same)
    assert noise["band_source"] == "decode"
    band = noise["bands"]["findings.COVID-19"]
    assert band["band"] == pytest.approx(shift[differ].max())
    assert band["p99"] == pytest.approx(np.percentile(shift[differ], 99))
    assert band["mean"] == pytest.approx(shift[differ].mean()) and band["n"] == len(differ)
    assert noise["band_rows"] == [int(i) for i in differ]
    runtime = noise["sources"]["runtime"]["scores"]["findings.COVID-19"]
    assert runtime["max"] == 0.0
    # Too few images whose two reads differ: the band comes from the re-encoded copies instead.
    few = ReadingVariants(index[:3], np.arange(3), index)
    assert measure_noise(m, index, reference, few, run_shifted, same)["band_source"] == "reencode"


def test_markdown_lists_every_score_and_the_flips(reference: tuple[dict[str, np.ndarray], Truth]) -> None:
    outputs, truth = reference
    cand = copy(outputs)
    cand["finding_logits"][0, 0] = -0.05
    report = parity_gate.judge(manifest(), outputs, cand, bands(), truth)
    text = markdown(report, "Parity gate: test")
    assert "PASSED" in text and "| findings.COVID-19 | yes |" in text and "COVID-19 1 (0)/0" in text
    assert "| findings.Pneumonia | no |" in text
