"""The epochs of tools/training/train.py: blocks 8-15, the heads and the mask decoder trained on the
cached views, early stopping on the validation loss, and an epoch checkpoint a later run resumes from."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tools.training.feature_cache import View
from tools.training.model import FROZEN_BLOCKS, CxrLite0
from tools.training.readout_figures import epoch_summary
from tools.training.targets import Targets, targets_at
from tools.training.train_losses import class_weights, losses, mirror_loss, pos_weights


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


class Stopped(Exception):
    """--stop-after-epoch reached: that epoch is checkpointed and a later run resumes after it."""

    def __init__(self, epoch: int) -> None:
        super().__init__(epoch)
        self.epoch = epoch


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
        summary = epoch_summary(val_out, val_t)
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
