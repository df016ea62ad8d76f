"""The validation comparison of tools/training/train_sequence_risk.py (sequence vs single-image risk, AUC
with 95 % patient-level bootstrap intervals), the decision whether to enable it, and the report."""

from __future__ import annotations

from typing import Any

import numpy as np

from appliance.interpret.sequence_risk import features
from appliance.result import Result
from tools.training import metrics
from tools.training.sequence_risk_model import FEATURES, FOLDS, Fitted
from tools.training.sequence_risk_pairs import Image, Pair


def parity_checks(pairs: list[Pair], model: Fitted, n: int = 3) -> list[dict[str, Any]]:
    """A few real pairs with the training-side probability, for the appliance-side parity test."""
    checks = []
    for pair in pairs:
        vector = features(pair.current, pair.prior, FEATURES)
        if vector is None:
            continue
        checks.append(
            {
                "current": pair.image.file,
                "current_offset_days": pair.image.offset_days,
                "prior": pair.prior_image.file,
                "prior_offset_days": pair.prior_image.offset_days,
                "probability": float(model.predict(vector[None])[0]),
            }
        )
        if len(checks) == n:
            break
    return checks


def counts(images: list[Image], results: dict[str, Result], pairs: list[Pair], side: str) -> dict[str, int]:
    imgs = [i for i in images if i.split == side]
    side_pairs = [p for p in pairs if p.split == side]
    return {
        "patients": len({i.patient for i in imgs}),
        "positive_patients": len({i.patient for i in imgs if i.adverse == 1}),
        "images": len(imgs),
        "images_not_read": sum(results[i.file].status != "ok" for i in imgs),
        "pairs": len(side_pairs),
        "pair_patients": len({p.patient for p in side_pairs}),
        "positive_pairs": sum(p.adverse for p in side_pairs),
    }


def auc_with_ci(y: np.ndarray, score: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    return {
        "auc": metrics.auc(y, score),
        "ci95": metrics.bootstrap_ci(groups, lambda idx: metrics.auc(y[idx], score[idx]), n_boot=2000),
    }


def compare(y: np.ndarray, single: np.ndarray, sequence: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    def difference(idx: np.ndarray) -> float | None:
        a, b = metrics.auc(y[idx], sequence[idx]), metrics.auc(y[idx], single[idx])
        return None if a is None or b is None else a - b

    return {
        "pairs": len(y),
        "patients": len(np.unique(groups)),
        "single_image": auc_with_ci(y, single, groups),
        "sequence": auc_with_ci(y, sequence, groups),
        "difference": {
            "auc": difference(np.arange(len(y))),
            "ci95": metrics.bootstrap_ci(groups, difference, n_boot=2000),
        },
    }


MIN_VALIDATION_PATIENTS = 20


def decide(validation: dict[str, Any], smoke: bool) -> tuple[bool, str]:
    seq, single = validation["sequence"]["auc"], validation["single_image"]["auc"]
    if smoke:
        return False, "smoke run: too few patients for any decision"
    if seq is None or single is None:
        return False, "validation pairs lack one outcome class, so no AUC can be compared"
    patients = validation["patients"]
    if patients < MIN_VALIDATION_PATIENTS:
        # A tie on a handful of patients says nothing; the text would claim "using earlier images" for
        # a model that has not shown it adds anything.
        return False, (
            f"only {patients} validation patients have an image with a prior (need {MIN_VALIDATION_PATIENTS}):"
            f" sequence AUC {seq:.3f} vs single-image {single:.3f}, difference interval"
            f" {_ci(validation['difference']['ci95'])} — too little evidence; the single-image risk stays"
        )
    ci = validation["difference"]["ci95"]
    if ci is not None and ci[0] > 0:
        return True, (
            f"validation AUC {seq:.3f} > single-image {single:.3f} and the difference's interval {_ci(ci)}"
            " excludes no change: the sequence risk beats the single-image risk"
        )
    # "Off unless it beats": a tie, or a lead whose interval still includes no change, keeps the
    # single-image risk, so "using earlier images" is never claimed for a model that adds nothing shown.
    return False, (
        f"validation AUC {seq:.3f} vs single-image {single:.3f}, difference interval {_ci(ci)}: not shown"
        " to beat the single-image risk, which stays"
    )


def _ci(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def auc_text(entry: dict[str, Any]) -> str:
    return f"{_num(entry['auc'])} {_ci(entry['ci95'])}"


def markdown(report: dict[str, Any]) -> str:
    v, t = report["validation"], report["data"]
    lines = [
        f"# Sequence-aware deterioration risk ({report['model']['name']} {report['model']['version']})",
        "",
        "Not for diagnostic use. Research demonstration on a very small public data set.",
        "",
        "| | train | validation |",
        "|---|---|---|",
        *(
            f"| {key.replace('_', ' ')} | {t['train'][key]} | {t['validation'][key]} |"
            for key in (
                "patients",
                "positive_patients",
                "images",
                "images_not_read",
                "pairs",
                "pair_patients",
                "positive_pairs",
            )
        ),
        "",
        f"Features: {', '.join(report['features'])}; L2 strength {report['lambda']} (grouped {FOLDS}-fold CV "
        f"on train); operating point {report['threshold']:.4f} (Youden on out-of-fold train predictions).",
        "",
        f"## Validation: {v['pairs']} images with a prior, {v['patients']} patients (95 % patient bootstrap)",
        "",
        "| risk | AUC [95 % CI] |",
        "|---|---|",
        f"| single-image | {auc_text(v['single_image'])} |",
        f"| sequence | {auc_text(v['sequence'])} |",
        f"| difference (sequence - single) | {auc_text(v['difference'])} |",
        "",
        f"Train, for context: single-image AUC {_num(report['train']['single_image_auc'])} is in-sample for "
        "the image model (it was trained on these patients); sequence out-of-fold AUC "
        f"{_num(report['train']['sequence_oof_auc'])}.",
        "",
        f"## Decision: {'enabled' if report['decision']['enabled'] else 'not enabled'}",
        "",
        report["decision"]["reason"] + ".",
        "",
        "Images not read were refused by the image model's gate (mostly its out-of-distribution guard on "
        "figure-style pictures); a pair needs two read images, as in the daemon's journal.",
        "",
        "Caveats: the outcome is per patient, not per image, so all images of a patient share a label; the "
        "image model's risk on train patients is optimistic, which can make the fit lean on it; with so "
        "few validation patients the intervals are wide and a different split could reverse the ranking.",
        "",
    ]
    return "\n".join(lines)
