"""A small picture of the X-ray for the ward display, cropped to the thorax.

Radiographs carry text burned into their pixels: the patient's name and ID, dates, the site, side
markers. It sits at the edges and corners, outside the chest. The thumbnail is cut to the model's lung
mask (its bounding box plus a margin), so that text is cut away instead of being recognised and blanked:
nothing has to find it for it to be gone. No DICOM header travels with the picture either. Without a
plausible lung mask there is no safe crop, so there is no thumbnail (never the uncropped image).

The coloured lesion overlay is drawn only when the reading publishes a heatmap (the manifest validated
it): otherwise the picture is the cropped X-ray alone.
"""

from __future__ import annotations

import base64
import io
import math
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from appliance.interpret.extent import line_counts, percentiles
from appliance.result import Result, ThoraxBox, Thumbnail

MAX_SIDE = 256
# Around the lung box, as a share of the box's own size: the apices, costophrenic angles and chest wall
# stay in, the image corners do not.
MARGIN = 0.06
# A mask outside these is not a pair of lungs (missing, merged into the background, noise).
PLAUSIBLE_AREA = (0.08, 0.75)  # share of the image covered
MIN_SPAN = 0.3  # box width and height, share of the image
SIDE_SHARE = (0.2, 0.8)  # share of the mask left of the image's midline: both lungs present
OVERLAY_ALPHA = 0.45
# Inferno-like ramp, the same stops as the display's heatmap colouring (app.js RAMP).
RAMP = np.array(
    [
        (0.0, 0, 0, 4),
        (0.25, 87, 16, 110),
        (0.5, 188, 55, 84),
        (0.75, 249, 142, 9),
        (1.0, 252, 255, 164),
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class ThumbnailImage:
    png: bytes
    width: int
    height: int
    crop: ThoraxBox
    overlay: str | None


def thorax_box(lungs: np.ndarray, threshold: float) -> ThoraxBox | str:
    """The lung mask's bounding box plus MARGIN, as fractions of the image; a str says why there is none.

    `lungs` is the lung probability in image geometry (any resolution). The 1st/99th percentiles of the
    mask's rows and columns bound it, so a few stray pixels near an edge cannot widen the crop."""
    mask = lungs >= threshold
    h, w = mask.shape
    # Everything below comes from the per-column and per-row counts, not from one index per pixel.
    columns = line_counts(mask, axis=0)
    pixels = int(columns.sum())
    area = pixels / mask.size if mask.size else 0.0
    if not PLAUSIBLE_AREA[0] <= area <= PLAUSIBLE_AREA[1]:
        return f"lung mask covers {area:.0%} of the image (plausible {PLAUSIBLE_AREA[0]:.0%}-{PLAUSIBLE_AREA[1]:.0%})"
    left_share = int(columns[: (w + 1) // 2].sum()) / pixels  # columns left of w / 2
    if not SIDE_SHARE[0] <= left_share <= SIDE_SHARE[1]:
        return f"lung mask is {left_share:.0%} on one side of the image: not two lungs"
    vertical = percentiles(line_counts(mask, axis=1), (1.0, 99.0))
    horizontal = percentiles(columns, (1.0, 99.0))
    if vertical is None or horizontal is None:  # cannot happen past the area check
        return "lung mask is empty"
    return box_with_margin(vertical, horizontal, (h, w))


def box_with_margin(vertical: np.ndarray, horizontal: np.ndarray, shape: tuple[int, int]) -> ThoraxBox | str:
    """The box between the lungs' bounding rows and columns (pixel indices, inclusive) plus MARGIN, as
    fractions of an image of `shape`; a str when it is too small to be a thorax."""
    (top, bottom), (left, right), (h, w) = vertical, horizontal, shape
    box = (left / w, top / h, (right + 1) / w, (bottom + 1) / h)
    span_x, span_y = box[2] - box[0], box[3] - box[1]
    if min(span_x, span_y) < MIN_SPAN:
        return f"lung mask spans {span_x:.0%} x {span_y:.0%} of the image (at least {MIN_SPAN:.0%} needed)"
    mx, my = MARGIN * span_x, MARGIN * span_y
    return ThoraxBox(
        left=round(max(0.0, box[0] - mx), 4),
        top=round(max(0.0, box[1] - my), 4),
        right=round(min(1.0, box[2] + mx), 4),
        bottom=round(min(1.0, box[3] + my), 4),
    )


def pixel_box(box: ThoraxBox, width: int, height: int) -> tuple[int, int, int, int]:
    """The crop in pixels of an image this size, rounded inwards: never a pixel outside the box."""
    return (
        math.ceil(box.left * width),
        math.ceil(box.top * height),
        max(math.ceil(box.left * width) + 1, math.floor(box.right * width)),
        max(math.ceil(box.top * height) + 1, math.floor(box.bottom * height)),
    )


def _colour(heat: np.ndarray) -> np.ndarray:
    v = np.clip(heat, 0, 1)
    return np.stack([np.interp(v, RAMP[:, 0], RAMP[:, k]) for k in (1, 2, 3)], axis=-1)


def render(
    pixels: np.ndarray, box: ThoraxBox, heat: np.ndarray | None = None, label: str | None = None
) -> ThumbnailImage:
    """Crop `pixels` (float (H, W) in [0, 1]) to `box`, shrink to MAX_SIDE, blend `heat` in if given."""
    h, w = pixels.shape
    crop = pixel_box(box, w, h)
    grey = Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8), mode="L").crop(crop)
    scale = min(1.0, MAX_SIDE / max(grey.size))
    size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
    small = grey.resize(size, Image.Resampling.BOX) if scale < 1 else grey
    # The box reported is the one actually cut (pixel edges), so a reader can check it against the image.
    actual = ThoraxBox(left=crop[0] / w, top=crop[1] / h, right=crop[2] / w, bottom=crop[3] / h)
    picture: Image.Image = small
    if heat is not None:
        # The heatmap (image geometry, coarse) resized onto the whole image, then cut like the X-ray.
        heat_full = Image.fromarray(heat.astype(np.float32), mode="F").resize(
            (w, h), Image.Resampling.BILINEAR
        )
        heat_small = np.asarray(
            heat_full.crop(crop).resize(size, Image.Resampling.BILINEAR), dtype=np.float32
        )
        base = np.asarray(small, dtype=np.float32)[..., None]
        alpha = OVERLAY_ALPHA * np.clip(heat_small, 0, 1)[..., None]
        rgb = base * (1 - alpha) + _colour(heat_small) * alpha
        picture = Image.fromarray(rgb.round().astype(np.uint8), mode="RGB")
    buffer = io.BytesIO()
    # zlib's Z_RLE strategy (the level then makes no difference): on the ward's critical path for every
    # image. Measured on cart thumbnails (256 px): grey 1.0 ms / 19.8 KiB against 1.6 ms / 23.5 KiB at
    # plain level 3 (level 1: 1.2 ms / 23.7 KiB); with the overlay 2.4 ms / 53.8 KiB against 3.9 ms /
    # 49.0 KiB (level 1: 2.6 ms / 52.5 KiB). ~0.6 ms of each is Pillow's per-row filter choice.
    picture.save(buffer, format="PNG", compress_level=3, compress_type=zlib.Z_RLE)
    return ThumbnailImage(
        png=buffer.getvalue(),
        width=size[0],
        height=size[1],
        crop=actual,
        overlay=label if heat is not None else None,
    )


def payload(result: Result, image: ThumbnailImage) -> Thumbnail:
    """The retained message for the result's bed: ids to match it to the result, no patient key."""
    return Thumbnail(
        message_id=result.message_id,
        image_id=result.image.image_id,
        site=result.site,
        device_id=result.device_id,
        location=result.location,
        width=image.width,
        height=image.height,
        crop=image.crop,
        overlay=image.overlay,
        png_base64=base64.b64encode(image.png).decode(),
    )
