#!/usr/bin/env python3
"""The parity gate shared by tools/engines/quantize.py and tools/engines/check_parity.py (the rule: docs/parity.md).

A candidate (FP16 or INT8 ONNX, a TensorRT engine, ...) stands in for the FP32 model only if, on the
validation patients and for every score the appliance PUBLISHES (the manifest's `published:` lists):

  1. accuracy   |AUC(candidate) - AUC(fp32)| <= 0.005 against the labels (regressions: |ΔMAE| <= 0.005 x
                the label's range; cardiothoracic ratio: |ΔMAE| <= 0.005; masks: |ΔDice| <= 0.005);
  2. deviation  the candidate moves scores no more than re-reading the same image does: on the images the
                reading noise was measured on, the 99th percentile and the mean of |Δscore| are at most
                the noise's, and over all images the 99th percentile is at most the noise's;
  3. decisions  no image whose FP32 score lies outside the band around an operating point changes its
                decision. The band is the largest |Δscore| re-reading produced on any of those images, so
                a flip outside it is one that re-reading never produces; flips inside are counted (also
                those beyond the noise's 99th percentile) and reported.

The reading noise: the FP32 model on each file decoded at full resolution instead of with the appliance's
reduced-size (DCT-scaled) decoding, on the validation images where the two reads differ. Also measured
and reported: FP32 run-to-run with another thread count and batch size, and a JPEG re-encoding. Scores
are compared as published and where decisions are taken: logits (capped where the 4-decimal score stops
changing) for sigmoid outputs, severity clipped to its range, the OOD distance, the view's top-2
log-odds margin, the cardiothoracic ratio, the zones' involvement. `python -m tools.engines.parity_gate noise
--model DIR` writes the noise to <model>/parity_noise.json; quantize.py and check_parity.py measure it
there when it is missing or was made for another model or image set.

Beside this file: parity_scores.py (what is compared: scores, deviations, decisions), parity_accuracy.py
(rule 1, against the labels), parity_noise.py (the reading noise) and parity_report.py (the Markdown).
`judge` here applies the rule.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from appliance.errors import ApplianceError, UserError
from appliance.manifest import Manifest, load_manifest
from tools.engines.onnx_runs import split_tensors
from tools.engines.parity_accuracy import Truth, accuracy
from tools.engines.parity_noise import fp32_reference_and_noise
from tools.engines.parity_report import noise_markdown
from tools.engines.parity_scores import decisions, deviation, distance, mask_threshold, scores, values
from tools.training import dataset

DEVIATION_PERCENTILE = 99.0


def judge(
    manifest: Manifest,
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    noise: dict[str, Any] | None,
    known: Truth | None = None,
) -> dict[str, Any]:
    """The verdict: one row per score (gated or reported), the flat list of checks, passed.

    `noise` is measure_noise's result (its "bands", and "band_rows": the images the band was measured
    on, where the candidate's deviation is compared with the noise pairwise); None: no noise known, every
    band 0 (any deviation fails)."""
    bands = (noise or {}).get("bands", {})
    paired = (noise or {}).get("band_rows")
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    for score in scores(manifest):
        if score.output not in candidate:
            rows.append({"key": score.key, "gated": score.gated, "missing": True})
            checks.append(
                {"check": f"{score.key}: output present", "value": None, "limit": None, "ok": False}
            )
            continue
        threshold = mask_threshold(manifest, score) if score.kind == "mask" else 0.5
        ref, cand = values(score, manifest, reference), values(score, manifest, candidate)
        diff = deviation(score, ref, cand, threshold)
        known_diff = diff[~np.isnan(diff)]
        noise = bands.get(score.key, {"band": 0.0, "p99": 0.0, "mean": 0.0, "source": "none", "n": 0})
        band = float(noise["band"])
        noise_p99 = float(noise.get("p99", band))
        row: dict[str, Any] = {
            "key": score.key,
            "output": score.output,
            "unit": score.unit,
            "gated": score.gated,
            "n": len(ref),
            "max_abs": float(known_diff.max()) if len(known_diff) else None,
            "mean_abs": float(known_diff.mean()) if len(known_diff) else None,
            "p99_abs": float(np.percentile(known_diff, DEVIATION_PERCENTILE)) if len(known_diff) else None,
            "band": band,
            "noise_p99": noise_p99,
            "noise_mean": float(noise["mean"]),
            "noise_source": noise["source"],
            "points": [],
        }
        if score.kind == "logit":
            p_ref, p_cand = 1 / (1 + np.exp(-ref)), 1 / (1 + np.exp(-cand))
            row["max_abs_probability"] = float(np.abs(p_cand - p_ref).max())
        own: list[dict[str, Any]] = []
        acc = accuracy(score, manifest, known, ref, cand)
        if acc is not None:
            acc["delta"] = abs(acc["candidate"] - acc["fp32"])
            acc["ok"] = acc["delta"] <= acc["limit"]
            row["accuracy"] = acc
            own.append(
                {
                    "check": f"{score.key}: |Δ{acc['metric']}|",
                    "value": acc["delta"],
                    "limit": acc["limit"],
                    "ok": acc["ok"],
                }
            )
        if paired is not None and len(paired):
            same = diff[np.asarray(paired, dtype=int)]
            same = same[~np.isnan(same)]
            if len(same):
                row["paired_p99_abs"] = float(np.percentile(same, DEVIATION_PERCENTILE))
                row["paired_mean_abs"] = float(same.mean())
                own.append(
                    {
                        "check": f"{score.key}: p99 |Δ| <= reading noise p99 (same images)",
                        "value": row["paired_p99_abs"],
                        "limit": noise_p99,
                        "ok": row["paired_p99_abs"] <= noise_p99,
                    }
                )
                own.append(
                    {
                        "check": f"{score.key}: mean |Δ| <= reading noise mean (same images)",
                        "value": row["paired_mean_abs"],
                        "limit": row["noise_mean"],
                        "ok": row["paired_mean_abs"] <= row["noise_mean"],
                    }
                )
        if row["p99_abs"] is not None:
            own.append(
                {
                    "check": f"{score.key}: p99 |Δ| over all images <= reading noise p99",
                    "value": row["p99_abs"],
                    "limit": noise_p99,
                    "ok": row["p99_abs"] <= noise_p99,
                }
            )
        if score.points:
            ref_d, cand_d = decisions(score, ref), decisions(score, cand)
            dist = distance(score, ref)
            for j, point in enumerate(score.points if score.kind != "zones" else score.points[:1]):
                cols = slice(None) if score.kind == "zones" else slice(j, j + 1)
                flipped = ref_d[:, cols] != cand_d[:, cols]
                inside = dist[:, cols] <= band
                entry = {
                    "point": point.name,
                    "threshold": point.threshold,
                    "inside_band": int((flipped & inside).sum()),
                    "outside_band": int((flipped & ~inside).sum()),
                    "beyond_noise_p99": int((flipped & (dist[:, cols] > noise_p99)).sum()),
                    "outside_rows": [int(i) for i in np.flatnonzero((flipped & ~inside).any(axis=1))[:20]],
                    "near_point": int(inside.sum()),
                }
                row["points"].append(entry)
                own.append(
                    {
                        "check": f"{score.key}: flips outside the band at {point.name}",
                        "value": entry["outside_band"],
                        "limit": 0,
                        "ok": entry["outside_band"] == 0,
                        "inside_band": entry["inside_band"],
                    }
                )
        row["ok"] = all(c["ok"] for c in own)
        for check in own:
            check["gated"] = score.gated
        rows.append(row)
        checks += own
    extra = {
        name: float(np.abs(np.asarray(candidate[name], np.float64) - np.asarray(ref_v, np.float64)).max())
        for name, ref_v in reference.items()
        if name in candidate
    }
    return {
        "passed": all(c["ok"] for c in checks if c.get("gated", True)),
        "n_images": len(next(iter(reference.values()))),
        "checks": [c for c in checks if c.get("gated", True)],
        "reported_only": [c for c in checks if not c.get("gated", True)],
        "scores": rows,
        "max_abs_diff": extra,
    }


# --- CLI: measure and print the noise --------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["noise"])
    dataset.add_model_and_data_arguments(parser)
    parser.add_argument("--limit", type=int, help="at most this many validation images")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of the reference")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.model)
        folder = dataset.data_dir(args.data)
        records, inputs = split_tensors(folder, manifest, "validation", args.limit)
        _, noise = fp32_reference_and_noise(manifest, folder, records, inputs, args.threads)
    except (UserError, ApplianceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(noise_markdown(noise))
    return 0


if __name__ == "__main__":
    sys.exit(main())
