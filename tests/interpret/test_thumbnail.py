"""The thumbnail PNG: encoded with zlib's Z_RLE strategy for speed, still lossless."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from appliance.interpret.thumbnail import MAX_SIDE, render
from appliance.result import ThoraxBox

BOX = ThoraxBox(left=0.1, top=0.05, right=0.9, bottom=0.85)


@pytest.mark.parametrize("with_heat", [False, True])
def test_png_decodes_to_the_picture_that_was_encoded(
    monkeypatch: pytest.MonkeyPatch, with_heat: bool
) -> None:
    encoded: list[np.ndarray] = []
    save = Image.Image.save

    def keep(self: Image.Image, fp: Any, format: str | None = None, **params: Any) -> None:
        encoded.append(np.asarray(self).copy())
        save(self, fp, format, **params)

    monkeypatch.setattr(Image.Image, "save", keep)
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:600, 0:500]
    pixels = np.clip(0.5 + 0.3 * np.sin(x / 40) * np.cos(y / 55) + rng.normal(0, 0.05, (600, 500)), 0, 1)
    heat = rng.random((16, 16)).astype(np.float32) if with_heat else None
    image = render(pixels, BOX, heat, "abnormal" if with_heat else None)
    with Image.open(io.BytesIO(image.png)) as png:
        decoded = np.asarray(png)
        assert png.mode == ("RGB" if with_heat else "L")
    assert max(image.width, image.height) == MAX_SIDE
    assert decoded.shape[:2] == (image.height, image.width)
    np.testing.assert_array_equal(decoded, encoded[-1])
