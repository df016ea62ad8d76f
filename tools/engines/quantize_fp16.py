"""The FP16 file: only the backbone in half precision (the heads, the OOD distance, the CAM and the mask
decoder stay FP32; make_fp16 says why), inputs and outputs FP32 as the manifest declares them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from tools.engines.qdq_graph import BACKBONE_PREFIXES


def _detach_outputs(model: onnx.ModelProto) -> None:
    """Give graph outputs that other nodes also read (the embedding) their own Identity.

    With keep_io_types the float16 converter casts such an output back to float32 but leaves its
    internal readers on the float32 name, which ONNX Runtime then refuses (mixed-type Gemm/Sub).
    """
    outputs = {o.name for o in model.graph.output}
    read = {name for node in model.graph.node for name in node.input}
    for name in sorted(outputs & read):
        internal = f"{name}__internal"
        for node in model.graph.node:
            node.output[:] = [internal if o == name else o for o in node.output]
            node.input[:] = [internal if i == name else i for i in node.input]
        model.graph.node.append(onnx.helper.make_node("Identity", [internal], [name], name=f"{name}__output"))


def make_fp16(fp32: Path, out: Path) -> dict[str, Any]:
    from onnxconverter_common import float16

    model = onnx.load(str(fp32))
    _detach_outputs(model)
    # Only the backbone runs in fp16. Kept fp32: the heads (their logits meet thresholds directly, and
    # the severity/risk heads weigh 1280 pooled features by up to ~250, which would multiply fp16's
    # 1e-3 relative error), the OOD distance (a difference of two large sums of squares: cancellation),
    # the CAM normalisation (ReduceSum/ReduceMax/Div) and the mask decoder with its Resize.
    blocked = [n.name for n in model.graph.node if not n.name.startswith(BACKBONE_PREFIXES)]
    converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)
    onnx.save(converted, str(out))
    onnx.checker.check_model(onnx.load(str(out)))
    kept = sorted({n.op_type for n in model.graph.node if n.name in set(blocked)})
    return {"fp32_op_types": kept, "fp32_nodes": len(blocked)}
