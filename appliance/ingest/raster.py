"""PNG and JPEG files via Pillow: 8/16-bit grey, colour reduced to luma, bombs refused before decoding."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFile, JpegImagePlugin, PngImagePlugin

from appliance.errors import InputRejected
from appliance.image import DecodedImage, ImageMeta
from appliance.ingest import reasons
from appliance.ingest.bounded import BoundedFile

# Decoding memory: a raster may decode to no more bytes than a 16-bit grey image at the pixel limit.
# A 59-megapixel RGBA PNG is within the pixel limit, yet decodes to 236 MB and peaked at 835 MB on its
# way to grey; its header is enough to refuse it.
_BUDGET_BYTES_PER_PIXEL = 2

_PLUGINS: dict[str, type[ImageFile.ImageFile]] = {
    "png": PngImagePlugin.PngImageFile,
    "jpeg": JpegImagePlugin.JpegImageFile,
}


def read_raster(path: Path, kind: str, *, max_pixels: int, target_size: int | None = None) -> DecodedImage:
    """`kind` is 'png' or 'jpeg', from the file's magic bytes (appliance.ingest.sniff)."""
    name = path.name
    try:
        # The plugin classes read only the header. Image.open would also run Pillow's global bomb check
        # (Image.MAX_IMAGE_PIXELS); ours below applies the configured limit with a clearer message.
        # BoundedFile: a chunk claiming 2 GB must not make Pillow allocate 2 GB; Pillow closes the
        # file it was given a name for, not one handed over, hence the `with img, fh` below.
        fh = BoundedFile(path)
        try:
            img: ImageFile.ImageFile = _PLUGINS[kind](fh, str(path))
        except BaseException:
            fh.close()
            raise
    except PermissionError as exc:
        raise InputRejected(reasons.PERMISSION_DENIED, f"{name}: {exc.strerror}") from exc
    except FileNotFoundError as exc:
        raise InputRejected(reasons.VANISHED, f"{name}: disappeared while reading") from exc
    except Image.DecompressionBombError as exc:  # ours below comes first; Pillow's must not escape either
        raise InputRejected(reasons.IMAGE_TOO_LARGE, f"{name}: {exc}") from exc
    except (SyntaxError, OSError, ValueError, struct.error) as exc:  # Pillow: SyntaxError = bad header
        raise InputRejected(
            reasons.INVALID_IMAGE, f"{name}: unreadable {kind.upper()} header ({exc})"
        ) from exc
    with img, fh:
        fmt = kind
        width, height = img.size
        if width * height > max_pixels:
            raise InputRejected(
                reasons.IMAGE_TOO_LARGE,
                f"{name}: {width} x {height} declared ({width * height:,} pixels > limit {max_pixels:,})",
            )
        mode = img.mode
        decoded, budget = _decoded_bytes(mode, width * height), max_pixels * _BUDGET_BYTES_PER_PIXEL
        if decoded > budget:
            raise InputRejected(
                reasons.IMAGE_TOO_LARGE,
                f"{name}: {width} x {height} {mode} declared ({decoded / 1e6:,.0f} MB decoded"
                f" > limit {budget / 1e6:,.0f} MB)",
            )
        scale = 1.0
        if fmt == "jpeg" and target_size and mode in ("L", "RGB", "YCbCr"):
            # libjpeg decodes straight at 1/2, 1/4 or 1/8 size: much less work when the model wants 256 px.
            img.draft("L", (target_size, target_size))
            scale = width / img.size[0]
        try:
            img.load()
        except Image.DecompressionBombError as exc:
            raise InputRejected(reasons.IMAGE_TOO_LARGE, f"{name}: {exc}") from exc
        except OSError as exc:
            # Pillow says "image file is truncated" / "broken data stream" for a short file.
            raise InputRejected(reasons.TRUNCATED_IMAGE, f"{name}: {exc}") from exc
        except Exception as exc:
            raise InputRejected(reasons.DECODE_FAILED, f"{name}: {type(exc).__name__}: {exc}") from exc
        pixels, bits = _to_unit_grey(img)
        try:
            turn = img.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception:  # a damaged EXIF block (Pillow: SyntaxError, struct.error): the picture as stored
            turn = 1
    pixels = _upright(pixels, turn)
    if turn in (5, 6, 7, 8):  # a quarter turn: the picture's rows are the file's columns
        width, height = height, width
    meta = ImageMeta(
        format=fmt,  # type: ignore[arg-type]
        rows=height,
        columns=width,
        bits_stored=bits,
        photometric="MONOCHROME2",
        extra={"mode": mode},
    )
    return DecodedImage(pixels=pixels, meta=meta, scale=scale)


def _upright(pixels: np.ndarray, orientation: object) -> np.ndarray:
    """The picture as a viewer shows it: a camera or phone stores it as the sensor saw it and says in EXIF
    Orientation (TIFF 6.0 tag 274) how to turn it; read unturned, a chest film lies on its side."""
    turned = {
        2: lambda a: a[:, ::-1],  # mirrored left to right
        3: lambda a: a[::-1, ::-1],  # half a turn
        4: lambda a: a[::-1, :],  # mirrored top to bottom
        5: lambda a: a.T,  # mirrored along the main diagonal
        6: lambda a: np.rot90(a, -1),  # a quarter turn clockwise
        7: lambda a: a[::-1, ::-1].T,  # mirrored along the other diagonal
        8: lambda a: np.rot90(a, 1),  # a quarter turn anticlockwise
    }.get(orientation if isinstance(orientation, int) else 1)
    return pixels if turned is None else np.ascontiguousarray(turned(pixels))


def _decoded_bytes(mode: str, pixels: int) -> int:
    """Bytes Pillow's decoded image of this mode holds (P and PA become RGBA on the way to grey)."""
    if mode in ("P", "PA"):
        return pixels * 4
    if mode.startswith("I;16"):
        return pixels * 2
    return pixels * Image.getmodebands(mode) * (4 if mode in ("I", "F") else 1)


def _to_unit_grey(img: Image.Image) -> tuple[np.ndarray, int]:
    """Any Pillow mode -> float32 (H, W) in [0, 1] and the bit depth it came with."""
    mode = img.mode
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float32)
        arr *= np.float32(1 / 65535)
        return arr, 16
    if mode == "I":
        # 16-bit PNGs open as "I" in some Pillow versions: the values are still 0..65535.
        arr = np.asarray(img).astype(np.float32)
        top = float(arr.max()) if arr.size else 0.0
        if top > 65535 or float(arr.min()) < 0:
            low = float(arr.min())
            arr -= np.float32(low)
            arr *= np.float32(1 / max(top - low, 1.0))
        else:
            arr *= np.float32(1 / 65535)
        return arr, 16
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32).copy()
        low, high = float(arr.min()), float(arr.max())
        arr -= np.float32(low)
        arr *= np.float32(1 / max(high - low, 1e-12))
        return arr, 32
    if mode in ("RGBA", "LA", "P", "PA"):
        # Drop alpha (as the data set was made), palette through RGB, then ITU-R 601 luma like convert('L').
        img = img.convert("RGBA" if mode in ("P", "PA") else mode).convert("RGB" if mode != "LA" else "L")
    if img.mode != "L":
        img = img.convert("L")
    arr = np.asarray(img).astype(np.float32)
    arr *= np.float32(1 / 255)
    return arr, 8
