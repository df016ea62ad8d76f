"""Scoring the Analyzer's Results against the labels (tools/training/evaluate.py): every figure with a 95 %
patient-level bootstrap interval where one makes sense, and only what a Result carries."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from appliance.interpret.cardiac import cardiothoracic_ratio
from appliance.interpret.decisions import audit_result
from appliance.result import Result
from tools.training import dataset as data
from tools.training import metrics

WITHIN_SOURCE_PAIRS: dict[str, tuple[str, str | None]] = {
    "nih normal vs pneumonia": ("nih", "Pneumonia"),
    "jsrt normal vs nodule": ("jsrt", "Nodule"),
    "c19r normal vs covid-19": ("c19r", "COVID-19"),
    "cohen normal vs abnormal": ("cohen", None),
}


def with_ci(
    out: dict[str, Any], key: str, groups: np.ndarray, metric: Callable[[np.ndarray], float | None], seed: int
) -> None:
    everyone = np.arange(len(groups))
    value = metric(everyone) if len(groups) else None
    out[key] = None if value is None else round(float(value), 4)
    ci = metrics.bootstrap_ci(groups, metric, seed=seed) if value is not None else None
    out[f"{key}_ci"] = [round(v, 4) for v in ci] if ci else None


def finding_score(result: Result, label: str) -> float | None:
    return next((f.score for f in result.findings if f.label == label), None)


Metric = Callable[[np.ndarray], float | None]


def auc_of(truth: np.ndarray, scores: np.ndarray) -> Metric:
    return lambda i: metrics.auc(truth[i], scores[i])


def within_auc_of(truth: np.ndarray, scores: np.ndarray, sources: np.ndarray) -> Metric:
    return lambda i: metrics.within_source_auc(truth[i], scores[i], sources[i])


def r2_of(truth: np.ndarray, pred: np.ndarray) -> Metric:
    return lambda i: metrics.r2(truth[i], pred[i])


def mae_of(truth: np.ndarray, pred: np.ndarray) -> Metric:
    return lambda i: metrics.mae(truth[i], pred[i])


def score(
    records: list[data.Record],
    results: list[Result],
    raw: dict[str, dict[str, str]],
    folder: Path,
    published: list[str],
    seed: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {"n_images": len(records), "n_images_ci": None}
    groups = np.array([r.patient_id for r in records])
    sources = np.array([r.source for r in records])
    ok = np.array([res.status == "ok" for res in results])
    refused = np.array([res.status == "refused" for res in results])
    cxr = np.array([r.is_cxr for r in records])
    view = np.array([r.view for r in records])
    lateral = cxr & (view == data.VIEW_LATERAL)
    known_frontal = cxr & (view == data.VIEW_FRONTAL)
    # A blank view (all of c19r) is a frontal X-ray by the data README's visual check: scored with them.
    frontal = cxr & (view != data.VIEW_LATERAL)

    def rate(mask: np.ndarray, flags: np.ndarray) -> Callable[[np.ndarray], float | None]:
        return lambda idx: float(flags[idx[mask[idx]]].mean()) if mask[idx].any() else None

    predicted_view = np.array(
        [0 if res.status == "ok" else 1 if res.reason == "lateral view" else 2 for res in results]
    )
    known_view = view >= 0
    with_ci(
        out,
        "view.accuracy",
        groups,
        lambda i: (
            float((predicted_view[i[known_view[i]]] == view[i[known_view[i]]]).mean())
            if known_view[i].any()
            else None
        ),
        seed,
    )
    with_ci(out, "refusal.lateral_refused_rate", groups, rate(lateral, refused), seed)
    with_ci(out, "refusal.ct_refused_rate", groups, rate(~cxr, refused | ~ok), seed)
    with_ci(out, "refusal.cxr_false_refusal_rate", groups, rate(frontal, ~ok), seed)
    with_ci(out, "refusal.labelled_frontal_false_refusal_rate", groups, rate(known_frontal, ~ok), seed)

    # --- abnormal and triage, on accepted frontal images with a label
    abnormal = np.array([r.abnormal for r in records])
    a_score = np.array([res.abnormal.score if res.abnormal else np.nan for res in results])
    has_a = frontal & ok & (abnormal >= 0) & ~np.isnan(a_score)

    def on(
        mask: np.ndarray, fn: Callable[[np.ndarray], float | None]
    ) -> Callable[[np.ndarray], float | None]:
        return lambda idx: fn(idx[mask[idx]]) if mask[idx].any() else None

    with_ci(out, "abnormal.auc", groups, on(has_a, lambda i: metrics.auc(abnormal[i], a_score[i])), seed)
    with_ci(
        out,
        "abnormal.auc_within_source",
        groups,
        on(has_a, lambda i: metrics.within_source_auc(abnormal[i], a_score[i], sources[i])),
        seed,
    )
    flagged = np.array([res.triage in ("abnormal", "urgent") for res in results])
    with_ci(
        out,
        "triage.sensitivity",
        groups,
        on(has_a & (abnormal == 1), lambda i: float(flagged[i].mean())),
        seed,
    )
    with_ci(
        out,
        "triage.specificity",
        groups,
        on(has_a & (abnormal == 0), lambda i: float((~flagged[i]).mean())),
        seed,
    )

    # --- findings (only those the model publishes)
    per_finding: dict[str, Any] = {}
    pooled, within = [], []
    for label in published:
        k = data.FINDING_LABELS.index(label) if label in data.FINDING_LABELS else None
        truth = np.array([r.labels[k] if k is not None and r.labels else -1 for r in records])
        s = np.array(
            [finding_score(res, label) if res.status == "ok" else None for res in results], dtype=float
        )
        mask = frontal & ok & (truth >= 0) & ~np.isnan(s)
        entry: dict[str, Any] = {
            "n_positive": int((truth[mask] == 1).sum()),
            "n_negative": int((truth[mask] == 0).sum()),
        }
        with_ci(entry, "auc", groups, on(mask, auc_of(truth, s)), seed)
        with_ci(
            entry,
            "auc_within_source",
            groups,
            on(mask, within_auc_of(truth, s, sources)),
            seed,
        )
        per_finding[label] = entry
        if entry["auc"] is not None:
            pooled.append(entry["auc"])
        if entry["auc_within_source"] is not None:
            within.append(entry["auc_within_source"])
    out["finding.macro_auc"] = round(float(np.mean(pooled)), 4) if pooled else None
    out["finding.macro_auc_ci"] = None
    out["finding.macro_auc_within_source"] = round(float(np.mean(within)), 4) if within else None
    out["finding.macro_auc_within_source_ci"] = None

    # --- within-source pairs that no source shortcut can inflate
    pairs: dict[str, Any] = {}
    for name, (pair_source, pair_label) in WITHIN_SOURCE_PAIRS.items():
        inside = has_a & (sources == pair_source)
        if pair_label is not None:
            k = data.FINDING_LABELS.index(pair_label)
            truth = np.array(
                [1 if r.labels and r.labels[k] == 1 else 0 if r.finding == 0 else -1 for r in records]
            )
            inside &= truth >= 0
        else:
            truth = abnormal
        entry = {"n": int(inside.sum())}
        with_ci(entry, "abnormal_auc", groups, on(inside, auc_of(truth, a_score)), seed)
        if pair_label is not None and pair_label in published:
            s = np.array([finding_score(res, pair_label) for res in results], dtype=float)
            with_ci(
                entry,
                f"{pair_label}_auc",
                groups,
                on(inside & ~np.isnan(s), auc_of(truth, s)),
                seed,
            )
        pairs[name] = entry

    # --- severity and outcome, as published
    for name, attr, top in (("extent", "extent", 8.0), ("opacity", "opacity", 6.0)):
        truth = np.array([getattr(r, attr) for r in records])
        pred = np.array(
            [
                getattr(res.severity, attr)
                if res.severity and getattr(res.severity, attr) is not None
                else np.nan
                for res in results
            ]
        )
        mask = ~np.isnan(truth) & ~np.isnan(pred)
        with_ci(
            out,
            f"severity.{name}_r2",
            groups,
            on(mask, r2_of(truth, pred)),
            seed,
        )
        if name == "extent":
            with_ci(
                out,
                "severity.extent_mae",
                groups,
                on(mask, mae_of(truth, pred)),
                seed,
            )
        out.setdefault("detail_severity", {})[name] = {
            "scored": int((~np.isnan(truth)).sum()),
            "published_for": int(mask.sum()),
            "max": top,
        }
    adverse = np.array([r.adverse for r in records])
    risk = np.array([res.risk.score if res.risk else np.nan for res in results])
    has_r = (adverse >= 0) & ~np.isnan(risk)
    with_ci(out, "outcome.auc", groups, on(has_r, auc_of(adverse, risk)), seed)
    # Hannover patients are nearly all ICU cases: within source, recognising Hannover does not help.
    with_ci(out, "outcome.auc_within_source", groups, on(has_r, within_auc_of(adverse, risk, sources)), seed)

    # --- cardiothoracic ratio against the reference masks; NIH cardiomegaly label
    cardiac: dict[str, Any] = {}
    ctr_pairs = []
    for r, res in zip(records, results, strict=True):
        if r.heart_mask_file and r.mask_file and res.cardiac is not None:
            reference = reference_ctr(r, folder)
            if reference is not None:
                ctr_pairs.append((reference, res.cardiac.ratio, r.patient_id))
    if ctr_pairs:
        ref = np.array([p[0] for p in ctr_pairs])
        got = np.array([p[1] for p in ctr_pairs])
        g = np.array([p[2] for p in ctr_pairs])
        with_ci(out, "cardiac.ctr_mae", g, lambda i: metrics.mae(ref[i], got[i]), seed)
        cardiac.update(
            n=len(ctr_pairs),
            pearson=round(float(np.corrcoef(ref, got)[0, 1]), 4) if len(ref) > 2 else None,
            enlarged_agreement=round(float(((ref >= 0.5) == (got >= 0.5)).mean()), 4),
            reference_enlarged=int((ref >= 0.5).sum()),
        )
    else:
        out["cardiac.ctr_mae"], out["cardiac.ctr_mae_ci"] = None, None
    nih_cm = [
        (("Cardiomegaly" in raw.get(r.file, {}).get("finding_raw", "")), res.cardiac.ratio)
        for r, res in zip(records, results, strict=True)
        if r.source == "nih" and res.cardiac is not None
    ]
    if nih_cm:
        truth_cm = np.array([t for t, _ in nih_cm])
        cardiac["nih_cardiomegaly_label"] = {
            "n_positive": int(truth_cm.sum()),
            "n": len(nih_cm),
            "auc_of_ratio": metrics.auc(truth_cm, np.array([v for _, v in nih_cm])),
        }
    cardiac["measured"] = int(sum(res.cardiac is not None for res in results))
    out["detail_cardiac"] = cardiac

    # --- zones: left/right share over everything published
    right = sum(z.involvement for res in results for z in res.zones if z.side == "right")
    left = sum(z.involvement for res in results for z in res.zones if z.side == "left")
    out["zones.left_share"] = round(left / (left + right), 4) if left + right > 0 else None
    out["zones.left_share_ci"] = None

    # --- text audit
    problems = []
    for r, res in zip(records, results, strict=True):
        found = audit_result(res)
        problems += [f"{r.file}: {p}" for p in found]
    out["text.contradictions"] = len(problems)
    out["text.contradictions_ci"] = None
    out["detail"] = {
        "findings": per_finding,
        "within_source_pairs": pairs,
        "text_problems": problems[:20],
        "status": dict(Counter(res.status for res in results)),
        "triage": dict(Counter(res.triage or "-" for res in results)),
        "refusal_reasons": dict(Counter(res.reason for res in results if res.status != "ok")),
        "counts": {
            "frontal_or_blank_view": int(frontal.sum()),
            "lateral": int(lateral.sum()),
            "ct": int((~cxr).sum()),
            "patients": len(set(groups)),
        },
    }
    out["detail"]["severity"] = out.pop("detail_severity")
    out["detail"]["cardiac"] = out.pop("detail_cardiac")
    return out


def reference_ctr(record: data.Record, folder: Path) -> float | None:
    with Image.open(folder / record.mask_file) as lung, Image.open(folder / record.heart_mask_file) as heart:
        lungs = np.asarray(lung.convert("L"), dtype=np.float32) / 255
        hearts = np.asarray(heart.convert("L"), dtype=np.float32) / 255
    measured = cardiothoracic_ratio(lungs, hearts)
    return None if measured is None else measured.ratio
