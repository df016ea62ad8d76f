"""The bench's report (tools/quality/bench.py): the raw measurements assembled into the figures, their
ratios to the baseline and the targets they meet (also the "Architecture v2" ratios), and OUT.md's tables."""

from __future__ import annotations

from typing import Any


def ratio(baseline: float | None, ours: float | None, higher_is_better: bool = False) -> float | None:
    if not baseline or not ours:
        return None
    return round((ours / baseline) if higher_is_better else (baseline / ours), 2)


def assemble(raw: dict[str, Any]) -> dict[str, Any]:
    e2e = raw["e2e"]["latency_ms"]
    base = raw["baseline"]
    out: dict[str, Any] = {
        "e2e_p95_ms": {c: s.get("p95") for c, s in e2e.items()},
        "e2e_p99_ms": {c: s.get("p99") for c, s in e2e.items()},
        "e2e_median_ms": {c: s.get("median") for c, s in e2e.items()},
        "throughput_images_per_s": raw["backlog"]["images_per_s"],
        "peak_rss_mb": raw["peak_rss_mb"],
        "startup_to_ready_ms": raw["startup_to_ready_ms"],
        "stages_ms": raw["stages_ms"],
        "stages_arriving_ms": raw.get("stages_arriving_ms", {}),
        "baseline": {
            "e2e_p95_ms": {c: s.get("p95") for c, s in base["e2e_ms"].items()},
            "e2e_median_ms": {c: s.get("median") for c, s in base["e2e_ms"].items()},
            "throughput_images_per_s": base["backlog"]["images_per_s"],
            "stages_ms": base["stages_ms"],
            "backlog": base["backlog"],
        },
    }
    out["throughput_ratio_vs_baseline"] = ratio(
        out["baseline"]["throughput_images_per_s"], out["throughput_images_per_s"], higher_is_better=True
    )
    out["e2e_p95_speedup_vs_baseline"] = {
        c: ratio(out["baseline"]["e2e_p95_ms"].get(c), v) for c, v in out["e2e_p95_ms"].items()
    }
    out["targets"] = {
        "e2e_p95_ms.uncompressed <= 150": _met(out["e2e_p95_ms"].get("uncompressed"), 150.0),
        "e2e_p95_ms.j2k <= 400": _met(out["e2e_p95_ms"].get("j2k"), 400.0),
        "throughput_ratio_vs_baseline >= 3": (out["throughput_ratio_vs_baseline"] or 0) >= 3.0,
        "peak_rss_mb <= 400": _met(out["peak_rss_mb"], 400.0),
    }
    out["architecture_v2"] = architecture_v2(out)
    return out | {k: v for k, v in raw.items() if k not in ("baseline",)} | {"baseline_detail": base}


def architecture_v2(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The "Architecture v2" issue's targets, as ratios from this one run: the time spent between the
    stages (end to end over the in-process stage sum), backlog and JPEG-lossless speed against the naive
    baseline, peak memory and start-up."""
    figures: dict[str, tuple[float | None, str, bool | None]] = {}

    def over(value: float | None, stages: dict[str, Any]) -> float | None:
        stage_sum = sum(v for v in stages.values() if isinstance(v, (int, float)))
        return round(value / stage_sum, 2) if value is not None and stage_sum else None

    # Against the stages timed back to back (warm), and against the same stages of images that arrive
    # as the end-to-end images do (tools/quality/bench_stages.py, measure_stages_arriving).
    for label, stages in (
        ("stage sum", out["stages_ms"].get("uncompressed", {})),
        ("stage sum as images arrive", out["stages_arriving_ms"].get("uncompressed", {})),
    ):
        median_ratio = over(out["e2e_median_ms"].get("uncompressed"), stages)
        p95_ratio = over(out["e2e_p95_ms"].get("uncompressed"), stages)
        figures[f"e2e median / {label}, uncompressed"] = (median_ratio, "<= 1.25", _met(median_ratio, 1.25))
        figures[f"e2e p95 / {label}, uncompressed"] = (p95_ratio, "<= 1.5", _met(p95_ratio, 1.5))
    lossless = ratio(
        out["baseline"]["e2e_median_ms"].get("jpeg_lossless"), out["e2e_median_ms"].get("jpeg_lossless")
    )
    backlog = out["throughput_ratio_vs_baseline"]
    figures["backlog vs baseline"] = (backlog, ">= 5", None if backlog is None else backlog >= 5.0)
    figures["jpeg_lossless e2e median vs baseline"] = (
        lossless,
        ">= 4",
        None if lossless is None else lossless >= 4.0,
    )
    figures["peak RSS MB (daemon)"] = (out["peak_rss_mb"], "<= 300", _met(out["peak_rss_mb"], 300.0))
    startup = out["startup_to_ready_ms"].get("median")
    figures["start-up to READY s"] = (
        None if startup is None else round(startup / 1000, 2),
        "<= 1.5",
        None if startup is None else startup <= 1500.0,
    )
    return {name: {"value": v, "target": t, "met": m} for name, (v, t, m) in figures.items()}


def _met(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# Benchmark ({'quick' if report['quick'] else 'full'}) — {env['cpu_model']}, {env['cpu_affinity']} CPU(s)",
        "",
        f"Command: `{report['command']}`  ",
        f"onnxruntime {env['versions']['onnxruntime']}, model {env['model']['name']} {env['model']['version']}, "
        f"ORT intra-op threads {env['threads']['ort_intra_op_threads']} (0 = all cores but one), "
        f"graph optimisation {env['threads']['ort_graph_optimization']}.",
        "",
        "| figure | ours | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    targets = {
        "uncompressed": ("<= 150 ms", "e2e_p95_ms.uncompressed <= 150"),
        "j2k": ("<= 400 ms", "e2e_p95_ms.j2k <= 400"),
    }
    for category, value in report["e2e_p95_ms"].items():
        base = report["baseline"]["e2e_p95_ms"].get(category)
        target, key = targets.get(category, ("", ""))
        met = report["targets"].get(key) if key else None
        lines.append(
            f"| e2e p95 ms, {category} | {value} | {base} | {ratio(base, value)}x | {target} | {_yes(met)} |"
        )
    lines.append(
        f"| backlog images/s ({report['backlog']['files']} files) | {report['throughput_images_per_s']} | "
        f"{report['baseline']['throughput_images_per_s']} | {report['throughput_ratio_vs_baseline']}x | >= 3x | "
        f"{_yes(report['targets']['throughput_ratio_vs_baseline >= 3'])} |"
    )
    lines.append(
        f"| peak RSS MB (daemon) | {report['peak_rss_mb']} | | | <= 400 | {_yes(report['targets']['peak_rss_mb <= 400'])} |"
    )
    lines.append(f"| start-up to READY ms | {report['startup_to_ready_ms'].get('median')} | | | | |")
    lines += [
        "",
        "Architecture v2 targets (ratios from this run):",
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
    ]
    for name, figure in report.get("architecture_v2", {}).items():
        lines.append(f"| {name} | {figure['value']} | {figure['target']} | {_yes(figure['met'])} |")
    lines += ["", "Per-stage medians (ms, in process; read = header parse, decode = pixels to float):", ""]
    stage_names = ["detect", "read", "decode", "preprocess", "infer", "interpret", "publish"]
    lines.append("| input | " + " | ".join(stage_names) + " |")
    lines.append("|---|" + "---|" * len(stage_names))
    rows = [*report["stages_ms"].items()]
    rows += [(f"{c}, as images arrive", s) for c, s in report.get("stages_arriving_ms", {}).items()]
    for category, stages in rows:
        lines.append(f"| {category} | " + " | ".join(str(stages.get(s, "")) for s in stage_names) + " |")
    base = report["baseline"]["stages_ms"]
    lines.append(
        "| baseline (all inputs) | | | "
        + " | ".join(str(round(base.get(s, 0), 2)) for s in ("decode", "preprocess", "infer"))
        + f" | | {round(base.get('publish', 0), 2)} |"
    )
    lines += ["", "Precisions (ONNX Runtime CPU, ms per image, median):", ""]
    lines.append(
        "| precision | batch 1 | batch 4 | speed-up vs fp32 (batch 1 / 4) | mean abs score delta"
        " | triage agreement |"
    )
    lines.append("|---|---|---|---|---|---|")
    for name, entry in report["precisions"].items():
        if not isinstance(entry, dict):
            continue
        vs = entry.get("vs_fp32", {})
        lines.append(
            f"| {name} | {entry['infer_ms_per_image_batch1'].get('median')} | "
            f"{entry['infer_ms_per_image_batch4'].get('median')} | {entry.get('speedup_vs_fp32_batch1')} / "
            f"{entry.get('speedup_vs_fp32_batch4')} | "
            f"{vs.get('score_abs_delta_mean', '')} | {vs.get('triage_agreement', '')} |"
        )
    lines.append(f"\nTensorRT: {report['precisions'].get('tensorrt')}")
    lines += ["", "Fast reading vs full-resolution reading, same model (fp32):", ""]
    lines.append("| input | images | max abs score delta | triage agreement |")
    lines.append("|---|---|---|---|")
    for category, entry in report.get("reading_parity", {}).items():
        lines.append(
            f"| {category} | {entry['images']} | {entry['score_abs_delta_max']} | {entry['triage_agreement']} |"
        )
    if report["missing_encoders"]:
        lines.append(f"\nNot generated: {report['missing_encoders']}")
    return "\n".join(lines) + "\n"


def _yes(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "NO")
