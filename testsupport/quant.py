"""INT8 Q/DQ of a small test graph with tools/engines/quantize_int8.py's TensorRT-10 settings (symmetric
int8, zero point 0, per-channel weights, float biases), calibrated on given arrays."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static


class ArrayReader(CalibrationDataReader):
    """Calibration batches of one image each from an (N, C, H, W) array."""

    def __init__(self, x: np.ndarray, input_name: str = "image") -> None:
        self.items: Iterator[np.ndarray] = iter(x)
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self.items, None)
        return None if item is None else {self.input_name: item[None]}


def quantize_for_tensorrt(fp32: Path, out: Path, calibration: np.ndarray, input_name: str = "image") -> None:
    quantize_static(
        str(fp32),
        str(out),
        ArrayReader(calibration, input_name),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
    )
