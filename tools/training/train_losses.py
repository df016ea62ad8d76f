"""The training losses: views, findings, abnormal and the lung/heart masks, weighted against class
imbalance, and the optional heatmap mirror-consistency term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tools.training.feature_cache import View
from tools.training.model import CxrLite0
from tools.training.targets import Targets


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
