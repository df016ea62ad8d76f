"""INT8 (explicit Q/DQ for TensorRT 10) and FP16 ONNX from the fp32 model, each judged by the parity gate.

    .venv/bin/cxr-quantize --model engines/cxr-lite0 [--data DIR] [--limit N]

The gate is tools/engines/parity_gate.py (rule and justification: docs/parity.md), the same code as
tools/engines/check_parity.py. It runs fp32 and each candidate on the validation patients (split.json) and
judges every published score; a candidate that fails is removed from the manifest, one that passes is
listed with its sha256 and `gate:` pointing at its report. Exit 0: all passed, 1: one failed, 2: usage.

INT8 is what TensorRT 10 explicit quantisation accepts: signed INT8, zero point 0, per-channel weights
(axis 0), per-tensor activations, float biases (TensorRT refuses an INT32 DequantizeLinear). It is
calibrated on TRAINING patients through the appliance's own reading and preprocessing. Which leading
backbone blocks stay float is chosen on other training images (`--float-blocks auto`): the fewest for
which the candidate passes the gate's label-free checks there (no flip outside the band, deviation within
0.8 of its limit); the validation set is only used for the verdict. The heads, the in-graph CAM, the OOD
distance and the mask decoder stay float; the pre-ReLU6 Q takes the post-ReLU6 scale.

The appliance's ONNX Runtime backend runs the INT8 file lowered in memory for the CPU (UINT8 activations,
appliance.backends.ort_lowering; the file stays what TensorRT reads). INT8 passes only when both forms
pass the gate: the file as it is and the lowered form (also in the float-block selection). Each report
also has the CPU latency of fp32 / int8 (lowered: int8_cpu, and as it is) / fp16 at batch 1 and 4 (ONNX
Runtime, one process, interleaved).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from tqdm import tqdm

from appliance.backends.ort_lowering import load_lowered
from appliance.errors import UserError
from appliance.manifest import Manifest, Precision, load_manifest, sha256_file
from tools.engines import parity_gate
from tools.training import dataset as data

BACKBONE_PREFIXES = ("/model/_conv_stem", "/model/_blocks", "/model/_conv_head")
QUANTISED_PREFIXES = BACKBONE_PREFIXES  # kept for callers of the old name
# Ops that carry Q/DQ in the INT8 graph. All are on TensorRT's explicit-quantisation list: Conv (regular
# and depthwise) fuses DQ(input) + DQ(weights) + Conv [+ Clip] + Q into an INT8 convolution, Add fuses
# with its input DQs and output Q (residual), Clip is a pointwise activation fused with the conv or the Q.
QDQ_OP_TYPES = ["Conv", "Add", "Clip"]
FLOAT_BLOCKS = "auto"
# On the selection images the deviation must stay within this share of the gate's limits: a 99th
# percentile estimated from a few hundred images is the 3rd-largest value or so, uncertain by ~20 %.
SELECTION_MARGIN = 0.8


class Calibration(CalibrationDataReader):
    def __init__(self, name: str, tensors: list[np.ndarray]) -> None:
        self.name = name
        self.items: Iterator[np.ndarray] = iter(tensors)

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self.items, None)
        return None if item is None else {self.name: item[None]}


def split_records(folder: Path, manifest: Manifest, which: str, limit: int | None) -> list[data.Record]:
    split = data.read_split(manifest.folder / "split.json")[which]
    records = [r for r in data.load_records(folder) if r.patient_id in split and not r.is_dicom]
    if limit:
        records = records[:: max(1, len(records) // limit)][:limit]
    if not records:
        raise UserError(f"{folder}: no {which} images of the model's split found")
    return records


def read_tensors(folder: Path, manifest: Manifest, records: list[data.Record], desc: str) -> np.ndarray:
    """The appliance's reading (reduced-size JPEG decoding) and preprocessing, as the cart does it."""
    return np.stack(
        [
            data.tensor(data.read_pixels(folder / r.file, manifest.input), manifest.input)
            for r in tqdm(records, desc=desc)
        ]
    )


def split_tensors(
    folder: Path, manifest: Manifest, which: str, limit: int | None
) -> tuple[list[data.Record], np.ndarray]:
    records = split_records(folder, manifest, which, limit)
    return records, read_tensors(folder, manifest, records, which)


# --- INT8 ---------------------------------------------------------------------------------------------


def backbone_units(model: onnx.ModelProto) -> list[str]:
    """The stem, each block and the head conv, in graph order (name prefixes)."""
    units: list[str] = []
    for node in model.graph.node:
        if node.name.startswith("/model/_blocks."):
            prefix = "/".join(node.name.split("/")[:3]) + "/"
        elif node.name.startswith(BACKBONE_PREFIXES):
            prefix = "/".join(node.name.split("/")[:3])
        else:
            continue
        if prefix not in units:
            units.append(prefix)
    return units


def float_nodes(model: onnx.ModelProto, float_blocks: int) -> list[str]:
    """Nodes to keep float: everything outside the backbone, plus the stem and the first `float_blocks`
    blocks (0: the whole backbone is quantised). A Clip/Relu reading a unit's output belongs to that unit
    (ReLU6 is the unit's activation, quantised with it)."""
    units = backbone_units(model)
    float_units = set(units[: float_blocks + 1]) if float_blocks > 0 else set()
    names = {n.name for n in model.graph.node}

    def unit_of(name: str) -> str | None:
        return next((u for u in units if name.startswith(u)), None)

    producer = {o: n for n in model.graph.node for o in n.output}
    owner: dict[str, str | None] = {}
    for node in model.graph.node:
        unit = unit_of(node.name)
        if unit is None and node.op_type in ("Clip", "Relu") and node.input[0] in producer:
            unit = unit_of(producer[node.input[0]].name)
        owner[node.name] = unit
    return sorted(n for n in names if owner[n] is None or owner[n] in float_units)


def activation_scales_follow_clip(model: onnx.ModelProto) -> int:
    """Conv -> Q -> DQ -> Clip(0, 6) -> Q: give the first Q the scale of the second.

    The quantiser calibrates the conv output before the activation: the stem's spans about ±80 (frozen
    ImageNet BatchNorm statistics) while ReLU6 keeps [0, 6], so one per-tensor step of 0.65 would erase the
    stem's signal. With the post-activation scale the Q saturates at the activation's range, which the
    Clip that follows makes exact: the same as quantising after the activation (TensorRT's placement)."""
    init = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    changed = 0
    for clip in (n for n in model.graph.node if n.op_type in ("Clip", "Relu")):
        dq_a = producer.get(clip.input[0])
        after = consumers.get(clip.output[0], [])
        if dq_a is None or dq_a.op_type != "DequantizeLinear" or not after:
            continue
        if not all(n.op_type == "QuantizeLinear" for n in after):
            continue
        q_a = producer.get(dq_a.input[0])
        if q_a is None or q_a.op_type != "QuantizeLinear":
            continue
        scale = numpy_helper.to_array(init[after[0].input[1]])
        for name in {q_a.input[1], dq_a.input[1]}:
            init[name].CopyFrom(
                numpy_helper.from_array(scale.astype(numpy_helper.to_array(init[name]).dtype), name)
            )
        changed += 1
    return changed


def _float_reader(
    node: onnx.NodeProto, float_names: set[str], consumers: dict[str, list[onnx.NodeProto]]
) -> bool:
    """A node that computes in float: kept float, or an activation whose output is not quantised."""
    if node.name in float_names:
        return True
    if node.op_type not in ("Clip", "Relu"):
        return False
    return not any(c.op_type == "QuantizeLinear" for c in consumers.get(node.output[0], []))


def dequantize_float_outputs(model: onnx.ModelProto, float_names: set[str]) -> int:
    """Drop Q/DQ pairs that only feed float nodes (the heads, the CAM, the mask decoder), and the pair in
    front of an activation whose output then stays float: the head conv reads INT8 and writes float.

    Such a pair adds rounding and no INT8 arithmetic (its readers dequantise anyway). Quantising the
    pooled embedding costs the severity and risk heads most: they weigh 1280 features by up to ~250."""
    removed = 0
    while True:
        producer = {o: n for n in model.graph.node for o in n.output}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        graph_outputs = {o.name for o in model.graph.output}

        pair = None
        for dq in model.graph.node:
            if dq.op_type != "DequantizeLinear" or dq.input[0] not in producer:
                continue
            q = producer[dq.input[0]]
            readers = consumers.get(dq.output[0], [])
            if q.op_type != "QuantizeLinear" or len(consumers.get(q.output[0], [])) != 1:
                continue
            if (
                readers
                and dq.output[0] not in graph_outputs
                and all(_float_reader(r, float_names, consumers) for r in readers)
            ):
                pair = (q, dq)
                break
        if pair is None:
            used = {name for node in model.graph.node for name in node.input}
            unused = [i for i in model.graph.initializer if i.name not in used]
            for initializer in unused:
                model.graph.initializer.remove(initializer)
            return removed
        q, dq = pair
        for node in consumers.get(dq.output[0], []):
            node.input[:] = [q.input[0] if i == dq.output[0] else i for i in node.input]
        model.graph.node.remove(q)
        model.graph.node.remove(dq)
        removed += 1


def check_tensorrt_qdq(model: onnx.ModelProto) -> dict[str, Any]:
    """What TensorRT 10 explicit quantisation needs: INT8, zero point 0, per-tensor activation scales,
    per-channel (axis 0) weight scales, no INT32 DequantizeLinear (float biases). Returns the problems
    found and which op types read a DequantizeLinear."""
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    problems: list[str] = []
    quantised: dict[str, int] = {}  # INT8 in, INT8 out: what TensorRT runs as INT8 kernels
    float_readers: dict[str, int] = {}  # float ops reading a dequantised tensor (the float heads)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = init.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if zero is None:
                problems.append(f"{node.name}: no zero point (int8 needs an explicit int8 zero point)")
            elif zero.dtype != np.int8 or np.any(zero != 0):
                problems.append(f"{node.name}: zero point {zero.dtype} {zero.ravel()[:3]} (needs int8 0)")
            scale = init.get(node.input[1])
            weight = node.op_type == "DequantizeLinear" and node.input[0] in init
            if scale is None:
                problems.append(f"{node.name}: scale is not a constant")
            elif not weight and scale.size != 1:
                problems.append(f"{node.name}: per-channel activation scale")
            if weight and init[node.input[0]].dtype != np.int8:
                problems.append(f"{node.name}: {init[node.input[0]].dtype} input (TensorRT: int8 only)")
        elif any(i in producer and producer[i].op_type == "DequantizeLinear" for i in node.input):
            readers = [c for o in node.output for c in consumers.get(o, [])]
            int8_out = bool(readers) and all(c.op_type == "QuantizeLinear" for c in readers)
            table = quantised if int8_out else float_readers
            table[node.op_type] = table.get(node.op_type, 0) + 1
            if node.op_type == "Conv" and node.input[1] in producer:
                dq = producer[node.input[1]]
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
                scale = init.get(dq.input[1])
                if scale is None or scale.size != init[dq.input[0]].shape[0] or attrs.get("axis", 1) != 0:
                    problems.append(f"{node.name}: weights not per-channel on axis 0")
    return {"problems": problems, "quantised_op_types": quantised, "float_readers_of_int8": float_readers}


def correct_biases(
    reference: onnx.ModelProto, model: onnx.ModelProto, calibration: np.ndarray, input_name: str
) -> list[str]:
    """Empirical bias correction: for each convolution that reads INT8 (graph order), add to its float
    bias the per-channel mean of (fp32 output - INT8 model output) on the calibration images, with every
    earlier correction already in place. `reference` is the BatchNorm-folded fp32 model the quantiser
    started from (same conv names and output tensors).

    Rounding weights and activations shifts each output channel's mean (a systematic error the next
    layers amplify); the bias stays float (TensorRT refuses an INT32 DequantizeLinear), so the shift can
    be taken out there and the graph stays what TensorRT reads: no Q/DQ, scale or zero point changes.
    Returns the corrected convs' names."""
    producer = {o: n for n in model.graph.node for o in n.output}
    in_reference = {o for n in reference.graph.node for o in n.output}
    convs = [
        n
        for n in model.graph.node
        if n.op_type == "Conv"
        and len(n.input) > 2
        and n.input[0] in producer
        and producer[n.input[0]].op_type == "DequantizeLinear"
        and n.output[0] in in_reference
    ]
    init = {i.name: i for i in model.graph.initializer}

    def channel_means(graph: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
        probe = onnx.ModelProto()
        probe.CopyFrom(graph)
        present = {o.name for o in probe.graph.output}
        probe.graph.output.extend(
            onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
            for n in names
            if n not in present
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for start in range(0, len(calibration), 16):
            for name, value in zip(
                names, sess.run(names, {input_name: calibration[start : start + 16]}), strict=True
            ):
                value = np.asarray(value, dtype=np.float64)
                sums[name] = sums.get(name, 0) + value.sum(axis=(0, 2, 3))
                counts[name] = counts.get(name, 0) + value.shape[0] * value.shape[2] * value.shape[3]
        return {n: sums[n] / counts[n] for n in names}

    target = channel_means(reference, [c.output[0] for c in convs])
    for conv in convs:
        shift = target[conv.output[0]] - channel_means(model, [conv.output[0]])[conv.output[0]]
        bias = init[conv.input[2]]
        value = numpy_helper.to_array(bias).astype(np.float64) + shift
        bias.CopyFrom(numpy_helper.from_array(value.astype(np.float32), bias.name))
    return [c.name for c in convs]


def make_int8(
    fp32: Path,
    out: Path,
    calibration: np.ndarray,
    input_name: str,
    method: str,
    float_blocks: int,
    bias_correction: bool = False,
) -> dict[str, Any]:
    # Fold BatchNorm into Conv first: Q/DQ on a raw conv output, before BN rescales each channel,
    # would put per-channel ranges that differ by orders of magnitude into one per-tensor scale.
    prepared = out.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    keep_float = float_nodes(model, float_blocks)
    quantize_static(
        str(prepared),
        str(out),
        Calibration(input_name, list(calibration)),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=keep_float,
        calibrate_method=getattr(CalibrationMethod, method),
        # TensorRT: symmetric (zero point 0) and no INT32 bias DequantizeLinear.
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
    )
    quantised = onnx.load(str(out))
    dropped = dequantize_float_outputs(quantised, set(keep_float))
    fixed = activation_scales_follow_clip(quantised)
    corrected = correct_biases(model, quantised, calibration, input_name) if bias_correction else []
    prepared.unlink()
    onnx.save(quantised, str(out))
    onnx.checker.check_model(onnx.load(str(out)))
    check = check_tensorrt_qdq(quantised)
    if check["problems"]:
        raise UserError(f"{out}: not TensorRT explicit-quantisation Q/DQ: {check['problems'][:3]}")
    return {
        "float_blocks": float_blocks,
        "clip_scales": fixed,
        "float_output_pairs_dropped": dropped,
        "bias_corrected_convs": len(corrected),
        **check,
    }


def select_float_blocks(
    fp32: Path,
    out: Path,
    calibration: np.ndarray,
    selection: np.ndarray,
    manifest: Manifest,
    bands: dict[str, dict[str, Any]],
    method: str,
    threads: int,
    bias_correction: bool = False,
) -> tuple[int, list[dict[str, Any]]]:
    """The fewest float leading blocks for which INT8 passes the gate's label-free checks on training
    images that were not used for calibration: no decision flip outside the band, and the deviation within
    SELECTION_MARGIN of its limit. Binary search: keeping more blocks float moves the candidate closer."""
    name = manifest.input.name
    reference = run(fp32, selection, name, threads=threads)
    units = backbone_units(onnx.load(str(fp32)))
    tried: dict[int, dict[str, Any]] = {}

    def within(n: int) -> bool:
        make_int8(fp32, out, calibration, name, method, n, bias_correction)
        worst = []
        for lower in (False, True):  # the file TensorRT reads, and the CPU lowering of it
            candidate = run(out, selection, name, threads=threads, lower=lower)
            verdict = parity_gate.judge(manifest, reference, candidate, {"bands": bands})
            worst += [
                c
                for c in verdict["checks"]
                if not c["ok"] or ("|Δ|" in c["check"] and c["value"] > SELECTION_MARGIN * c["limit"])
            ]
        tried[n] = {"float_blocks": n, "ok": not worst, "exceeded": [c["check"] for c in worst]}
        print(f"  float blocks {n}: {'within' if not worst else 'exceeds'} the limits on training images")
        return not worst

    low, high = 0, len(units) - 2  # high: the stem and every block float, only the head conv INT8
    if within(low):
        return low, list(tried.values())
    if not within(high):
        return high, list(tried.values())
    while high - low > 1:
        middle = (low + high) // 2
        if within(middle):
            high = middle
        else:
            low = middle
    return high, sorted(tried.values(), key=lambda t: t["float_blocks"])


# --- FP16 ---------------------------------------------------------------------------------------------


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


# --- running and timing ------------------------------------------------------------------------------


def session(path: Path, threads: int = 1, lower: bool = False) -> ort.InferenceSession:
    """`lower`: the INT8 file as the appliance's ONNX Runtime backend runs it on the CPU (rewritten in
    memory by appliance.backends.ort_lowering); else the file as it is (what TensorRT reads)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    model: str | bytes = load_lowered(path)[0] if lower else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run(
    path: Path, x: np.ndarray, input_name: str, batch: int = 16, threads: int = 1, lower: bool = False
) -> dict[str, np.ndarray]:
    sess = session(path, threads, lower)
    names = [o.name for o in sess.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(x), batch):
        for name, value in zip(names, sess.run(names, {input_name: x[start : start + batch]}), strict=True):
            parts[name].append(np.asarray(value, dtype=np.float32))
    return {n: np.concatenate(v) for n, v in parts.items()}


def timings(
    files: dict[str, Path], x: np.ndarray, input_name: str, repeats: int, threads: int
) -> dict[str, Any]:
    """Median latency per file at batch 1 and 4, interleaved in one process so load changes hit all.
    A key ending in "_cpu" runs its file lowered for the CPU (as the appliance's backend does)."""
    sessions = {k: session(p, threads, lower=k.endswith("_cpu")) for k, p in files.items()}
    samples: dict[str, list[float]] = {f"{k}.b{b}": [] for k in files for b in (1, 4)}
    for _ in range(3):
        for s in sessions.values():
            for b in (1, 4):
                s.run(None, {input_name: x[:b]})
    for _ in range(repeats):
        for k, s in sessions.items():
            for b in (1, 4):
                start = time.perf_counter()
                s.run(None, {input_name: x[:b]})
                samples[f"{k}.b{b}"].append((time.perf_counter() - start) * 1000)
    median = {k: float(np.median(v)) for k, v in samples.items()}
    speedup = {
        k: median[f"fp32.b{k.rsplit('.b', 1)[1]}"] / v for k, v in median.items() if "fp32.b1" in samples
    }
    return {"threads": threads, "repeats": repeats, "median_ms": median, "speedup_vs_fp32": speedup}


# --- reports and manifest ----------------------------------------------------------------------------


def write_report(
    folder: Path, precision: str, report: dict[str, Any], noise: dict[str, Any] | None = None
) -> str:
    stem = f"parity_{precision}"
    (folder / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = parity_gate.markdown(report, f"Parity gate: {precision} vs fp32", noise)
    if report.get("cpu_lowered"):
        cpu = parity_gate.markdown(report["cpu_lowered"], f"{precision} lowered for the CPU vs fp32")
        text += (
            "\nThe table above judges the file as TensorRT reads it. The appliance's ONNX Runtime backend runs"
            " it lowered in memory for the CPU (UINT8 activations, appliance.backends.ort_lowering); the"
            " verdict above requires that form to pass too:\n\n" + "#" + cpu
        )
    extra = [f"- {k}: {v}" for k, v in report.get("build", {}).items()]
    if extra:
        text += "\n## How it was built\n\n" + "\n".join(extra) + "\n"
    if report.get("timing"):
        t = report["timing"]
        text += (
            f"\n## CPU latency (ONNX Runtime, {t['threads']} thread, median of {t['repeats']}, one process)\n\n"
            + "\n".join(
                f"- {k}: {v:.2f} ms ({t['speedup_vs_fp32'].get(k, 1):.2f}x fp32)"
                for k, v in t["median_ms"].items()
            )
            + "\n"
        )
    (folder / f"{stem}.md").write_text(text)
    return f"{stem}.md"


def update_manifest(manifest_path: Path, entries: dict[str, dict[str, str] | None]) -> None:
    content = yaml.safe_load(manifest_path.read_text())
    header = manifest_path.read_text().split("\n", 1)[0]
    for precision, entry in entries.items():
        if entry is None:
            content["onnx"].pop(precision, None)
        else:
            content["onnx"][precision] = entry
    manifest_path.write_text(header + "\n" + yaml.safe_dump(content, sort_keys=False, allow_unicode=True))
    load_manifest(manifest_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=data.REPO / "engines" / "cxr-lite0", help="model folder"
    )
    parser.add_argument("--data", help="data folder (default $CXR_DATA or ../shared/data/cxr)")
    parser.add_argument("--calibration-images", type=int, default=96, help="training images to calibrate on")
    parser.add_argument(
        "--selection-images",
        type=int,
        default=256,
        help="other training images to choose the float blocks on (default 256)",
    )
    parser.add_argument("--limit", type=int, help="gate on at most this many validation images (CI)")
    parser.add_argument("--method", default="MinMax", choices=["MinMax", "Percentile", "Entropy"])
    parser.add_argument("--precisions", default="int8,fp16")
    parser.add_argument(
        "--float-blocks",
        default=FLOAT_BLOCKS,
        help="'auto' (default), or keep the stem and this many first blocks float (0: quantise all)",
    )
    parser.add_argument(
        "--bias-correction",
        action="store_true",
        help="INT8: correct each INT8 conv's float bias by its mean output shift on the calibration images",
    )
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    parser.add_argument("--bench-repeats", type=int, default=30, help="latency repeats per model (0: skip)")
    args = parser.parse_args(argv)
    try:
        if args.float_blocks != "auto" and not str(args.float_blocks).isdigit():
            raise UserError(f"--float-blocks {args.float_blocks!r}: 'auto' or a number >= 0")
        manifest = load_manifest(args.model)
        manifest.verify_file(Precision.fp32)
        return quantize(args, manifest)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def quantize(args: argparse.Namespace, manifest: Manifest) -> int:
    folder = data.data_dir(args.data)
    fp32 = manifest.onnx_path(Precision.fp32)
    name = manifest.input.name
    picked = split_records(folder, manifest, "train", args.calibration_images + args.selection_images)
    chosen = set(
        np.linspace(0, len(picked) - 1, min(args.calibration_images, len(picked))).round().astype(int)
    )
    calibration = read_tensors(
        folder, manifest, [r for i, r in enumerate(picked) if i in chosen], "calibration (train)"
    )
    selection = read_tensors(
        folder, manifest, [r for i, r in enumerate(picked) if i not in chosen] or picked, "selection (train)"
    )
    records, val = split_tensors(folder, manifest, "validation", args.limit)
    reference = run(fp32, val, name, threads=args.threads)
    noise = parity_gate.load_or_measure_noise(
        manifest,
        folder,
        records,
        val,
        reference,
        lambda x: run(fp32, x, name, threads=args.threads),
        lambda x: run(fp32, x, name, batch=1, threads=args.threads + 1),
    )
    known = parity_gate.Truth.load(records, folder)
    all_passed, entries, files = True, {}, {"fp32": fp32}
    reports: dict[str, dict[str, Any]] = {}
    for precision in args.precisions.split(","):
        target = manifest.folder / f"model.{precision}.onnx"
        if precision == "int8":
            tried: list[dict[str, Any]] = []
            if args.float_blocks == "auto":
                blocks, tried = select_float_blocks(
                    fp32,
                    target,
                    calibration,
                    selection,
                    manifest,
                    noise["bands"],
                    args.method,
                    args.threads,
                    args.bias_correction,
                )
            else:
                blocks = int(args.float_blocks)
            build = make_int8(fp32, target, calibration, name, args.method, blocks, args.bias_correction)
            build.update(
                {
                    "calibration_images": len(calibration),
                    "calibration_method": args.method,
                    "bias_correction": args.bias_correction,
                    "selection_images": len(selection) if tried else 0,
                    "selection_margin": SELECTION_MARGIN if tried else None,
                    "selection": tried,
                    "qdq_op_types": QDQ_OP_TYPES,
                }
            )
        elif precision == "fp16":
            build = make_fp16(fp32, target)
        else:
            raise UserError(f"unknown precision {precision!r} (int8 or fp16)")
        report = parity_gate.judge(
            manifest, reference, run(target, val, name, threads=args.threads), noise, known
        )
        report.update(
            {
                "precision": precision,
                "file": target.name,
                "sha256": sha256_file(target),
                "build": build,
                "noise_file": parity_gate.NOISE_FILE,
                "bands": noise["bands"],
                "calibration_images": len(calibration) if precision == "int8" else 0,
                "calibration_method": args.method if precision == "int8" else None,
                "float_blocks": build.get("float_blocks"),
            }
        )
        if precision == "int8":
            # The appliance's ONNX Runtime backend runs this file lowered for the CPU (UINT8 activations,
            # appliance.backends.ort_lowering): that form must pass the same gate.
            cpu = parity_gate.judge(
                manifest, reference, run(target, val, name, threads=args.threads, lower=True), noise, known
            )
            report["cpu_lowered"] = cpu
            report["passed"] = report["passed"] and cpu["passed"]
            files["int8_cpu"] = target
        reports[precision] = report
        files[precision] = target
        entries[precision] = (
            {"file": target.name, "sha256": report["sha256"], "gate": f"parity_{precision}.md"}
            if report["passed"]
            else None
        )
        all_passed &= report["passed"]
    timing = timings(files, val, name, args.bench_repeats, args.threads) if args.bench_repeats > 0 else None
    for precision, report in reports.items():
        report["timing"] = timing
        md = write_report(manifest.folder, precision, report, noise)
        print(f"{precision}: gate {'PASSED' if report['passed'] else 'FAILED'} ({manifest.folder / md})")
        for check in report["checks"]:
            if not check["ok"]:
                print(f"  failed: {check['check']} = {check['value']} (limit {check['limit']})")
    if timing:
        print("latency ms: " + ", ".join(f"{k} {v:.1f}" for k, v in timing["median_ms"].items()))
    update_manifest(manifest.folder / "manifest.yaml", entries)
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
