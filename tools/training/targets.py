"""Per-image training targets (view, finding labels, abnormal, which masks exist), one row per image of a
split followed by its generated negatives, aligned with the cached views (tools/training/feature_cache.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tools.training import dataset as data
from tools.training.model import FINDING_LABELS


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
