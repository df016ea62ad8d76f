from __future__ import annotations

import numpy as np
import pytest

from appliance.manifest import InputSpec
from appliance.preprocess import fit, preprocess, unfit


def spec(**kw: object) -> InputSpec:
    base: dict[str, object] = {"name": "x", "height": 32, "width": 32}
    base.update(kw)
    return InputSpec.model_validate(base)


def test_letterbox_keeps_aspect_and_pads() -> None:
    image = np.ones((100, 50), dtype=np.float32)
    canvas, geometry = fit(image, spec(pad_value=0.0))
    assert canvas.shape == (32, 32)
    assert (geometry.height, geometry.width) == (32, 16)
    assert geometry.left == 8 and geometry.top == 0
    assert canvas[:, :8].max() == 0.0 and canvas[:, 8:24].min() == pytest.approx(1.0)


def test_center_crop_fills_the_input() -> None:
    image = np.linspace(0, 1, 100 * 50, dtype=np.float32).reshape(100, 50)
    canvas, _ = fit(image, spec(aspect="center_crop"))
    assert canvas.shape == (32, 32) and canvas.min() > 0.0


def test_area_downsampling_preserves_the_mean_of_a_12_bit_like_image() -> None:
    rng = np.random.default_rng(0)
    image = (rng.integers(0, 4096, size=(3000, 2500)) / 4095).astype(np.float32)
    canvas, _ = fit(image, spec(height=256, width=256, aspect="stretch"))
    assert canvas.mean() == pytest.approx(image.mean(), abs=1e-3)


def test_intensity_conventions_and_layouts() -> None:
    image = np.full((10, 10), 0.5, dtype=np.float32)
    xrv, _ = preprocess(image, spec(channels=1, intensity={"range": [-1024, 1024]}))
    assert xrv.shape == (1, 32, 32) and xrv[0, 16, 16] == pytest.approx(0.0)
    keras, _ = preprocess(
        np.ones((10, 10), np.float32), spec(channels=3, layout="NHWC", intensity={"range": [-1, 1]})
    )
    assert keras.shape == (32, 32, 3) and keras[5, 5, 2] == pytest.approx(1.0)
    imagenet = spec(channels=3, intensity={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    tensor, _ = preprocess(image, imagenet)
    assert tensor[0, 16, 16] == pytest.approx((0.5 - 0.485) / 0.229, rel=1e-5)
    assert tensor[2, 16, 16] == pytest.approx((0.5 - 0.406) / 0.225, rel=1e-5)


def test_float16_input_dtype() -> None:
    tensor, _ = preprocess(np.zeros((8, 8), np.float32), spec(dtype="float16"))
    assert tensor.dtype == np.float16


def test_mean_std_length_must_match_channels() -> None:
    with pytest.raises(ValueError, match=r"intensity.mean has 2 values for 3 channel"):
        spec(channels=3, intensity={"mean": [0.1, 0.2]})


def test_unfit_crops_the_padding_back_off() -> None:
    image = np.ones((100, 50), dtype=np.float32)
    s = spec()
    _, geometry = fit(image, s)
    heat = np.zeros((8, 8), np.float32)
    assert unfit(heat, geometry, s).shape == (8, 4)
