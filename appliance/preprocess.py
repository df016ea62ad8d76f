"""Manifest-driven image -> tensor. Nothing here knows about a particular model.

The same functions are used by training (tools/training/train.py) and by the appliance, so the model sees
identical pixels in both places.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from appliance.manifest import InputSpec


@dataclass(frozen=True)
class Geometry:
    """Where the image sits inside the model input, to map heatmaps back onto the image."""

    source_height: int
    source_width: int
    top: int  # rows of padding (letterbox) or rows cropped (negative, center_crop) in model pixels
    left: int
    height: int  # size of the image content inside the model input
    width: int


def fit(pixels: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, Geometry]:
    """Resize a float32 (H, W) image in [0, 1] to the model's size as the manifest says."""
    src_h, src_w = pixels.shape
    out_h, out_w = spec.height, spec.width
    if spec.aspect == "stretch":
        new_h, new_w = out_h, out_w
    else:
        scale = (
            min(out_h / src_h, out_w / src_w)
            if spec.aspect == "letterbox"
            else max(out_h / src_h, out_w / src_w)
        )
        new_h, new_w = max(1, round(src_h * scale)), max(1, round(src_w * scale))
    # BOX is area averaging when shrinking (no aliasing from a 3000 px detector image), bilinear-like
    # when enlarging; float mode "F" keeps 12-16 bit precision.
    resample = Image.Resampling.BOX if new_h <= src_h else Image.Resampling.BILINEAR
    resized = np.asarray(Image.fromarray(pixels, mode="F").resize((new_w, new_h), resample), dtype=np.float32)
    canvas = np.full((out_h, out_w), spec.pad_value, dtype=np.float32)
    top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
    if spec.aspect == "center_crop":
        canvas[:, :] = resized[-top : -top + out_h, -left : -left + out_w]
    else:
        canvas[top : top + new_h, left : left + new_w] = resized
    return canvas, Geometry(src_h, src_w, top, left, new_h, new_w)


def normalise(canvas: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(H, W) in [0, 1] -> one sample in the manifest's layout, channels and intensity convention."""
    low, high = spec.intensity.range
    values = canvas * np.float32(high - low) + np.float32(low)
    channels = np.repeat(values[None, :, :], spec.channels, axis=0)  # (C, H, W)
    mean = np.asarray(spec.intensity.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.intensity.std, dtype=np.float32).reshape(-1, 1, 1)
    channels = (channels - mean) / std
    if spec.layout == "NHWC":
        channels = np.transpose(channels, (1, 2, 0))
    return np.ascontiguousarray(channels, dtype=np.float16 if spec.dtype == "float16" else np.float32)


def preprocess(pixels: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, Geometry]:
    canvas, geometry = fit(pixels, spec)
    return normalise(canvas, spec), geometry


def unfit(map_in_model: np.ndarray, geometry: Geometry, spec: InputSpec) -> np.ndarray:
    """Crop a map in model-input coordinates (any resolution) back to the image content region."""
    map_h, map_w = map_in_model.shape
    sy, sx = map_h / spec.height, map_w / spec.width
    if spec.aspect == "center_crop":
        return map_in_model
    top, left = round(geometry.top * sy), round(geometry.left * sx)
    bottom = max(top + 1, round((geometry.top + geometry.height) * sy))
    right = max(left + 1, round((geometry.left + geometry.width) * sx))
    return map_in_model[top:bottom, left:right]
