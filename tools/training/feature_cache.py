"""The frozen part's output, computed once per augmented view of every image and cached (fp16) on disk.

The stem and blocks 0-7 keep their ImageNet weights, so each epoch of tools/training/train.py trains on a
random cached view instead of running them again; a restart reuses every view already written.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tools.training import dataset as data
from tools.training.model import CxrLite0

NEGATIVES = 300  # generated "not a chest X-ray" pictures in the training set (part of the cache key)
CACHE_VERSION = "v2-1"  # bump when what is cached (augmentation, frozen part) changes


@dataclass
class View:
    """One cached augmented view of a split: frozen features, stride-8 skip and warped mask targets."""

    frozen: torch.Tensor  # (N, 80, 16, 16) fp16
    skip: torch.Tensor  # (N, 40, 32, 32) fp16
    masks: torch.Tensor  # (N, 2, 64, 64) fp16: lung, heart


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
