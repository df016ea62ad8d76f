"""Benchmark: the appliance against a newcomer's baseline, on the same files, in one run.

    python -m tools.quality.bench --json bench.json            # full run (a few minutes on 2 cores)
    python -m tools.quality.bench --quick --json bench.json    # CI smoke: a handful of files, no targets asserted

Writes OUT (JSON) and OUT.md (a table: each figure, the baseline's, the ratio, the target).

Inputs: the real DICOMs and some real images of the shared data set ($CXR_DATA, default
../shared/data/cxr), plus cart-sized DICOMs made from real images by tools/quality/gen_cart_dicoms.py in each
transfer syntax a cart sends. Every measurement has a warm-up and repeats; medians, p95 and p99.

What is measured
- stages (in process, per syntax): file-closed detection (FolderWatcher + inotify), read (header
  parse), decode (pixels to float [0, 1], what the decoder needs beyond the header), preprocess,
  inference, interpret, MQTT publish to PUBACK (the appliance's outbox + publisher, real Mosquitto).
- end to end: the real daemon (`cxr-appliance run`, a subprocess with an sd_notify socket and a real
  Mosquitto); a file is written into the watched folder and closed, and the clock stops when a
  subscriber receives the result (the broker forwards it as it acknowledges it).
- backlog: N files (default 500) renamed into the inbox at once; throughput until the last result.
- peak RSS (VmHWM) of the daemon, start-up time to READY=1.
- each precision the model ships (fp32, fp16, int8 Q/DQ) on ONNX Runtime CPU: speed and the score
  delta against fp32 on real images; TensorRT when importable (else skipped with the reason).
- BASELINE: pydicom `pixel_array` at full resolution (float64) -> PIL resize -> ONNX Runtime with
  default session options, one image at a time, publishing each result with paho (QoS 1, waiting for
  the PUBACK). Its end-to-end figure starts at the closed file (no folder watching: in its favour).

Beside this file: bench_inputs.py (plan, files), bench_stages.py (in process), bench_precisions.py
(inference per precision, in fresh processes), bench_daemon.py (the real daemon), bench_baseline.py,
bench_report.py (figures, targets, Markdown), bench_environment.py and bench_timing.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.backends.onnxruntime import OnnxRuntimeConfig
from appliance.manifest import Precision, load_manifest
from testsupport.mosquitto import Broker
from tools.quality.bench_baseline import Baseline, measure_baseline
from tools.quality.bench_daemon import DaemonRun, measure_backlog, measure_e2e
from tools.quality.bench_environment import environment
from tools.quality.bench_inputs import Plan, Restamper, backlog_files, prepare_inputs
from tools.quality.bench_precisions import infer_timing, measure_ort_sweep, measure_precisions
from tools.quality.bench_report import assemble, markdown
from tools.quality.bench_stages import (
    make_analyzer,
    measure_detection,
    measure_publish,
    measure_reading_parity,
    measure_stages,
    measure_stages_arriving,
)
from tools.quality.bench_timing import log, summary
from tools.training import dataset

DEFAULT_MODEL = dataset.REPO / "engines" / "cxr-lite0" / "manifest.yaml"


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.make(args.quick, args.backlog)
    data = dataset.data_dir(args.data)
    manifest_path = Path(args.model).resolve()  # the daemon resolves relative paths against its config
    manifest = load_manifest(manifest_path)
    ort_config = OnnxRuntimeConfig(intra_op_threads=args.intra_op_threads)
    work = Path(tempfile.mkdtemp(prefix="cxr-bench-", dir=args.workdir))
    restamper = Restamper()
    raw: dict[str, Any] = {
        "quick": plan.quick,
        "plan": plan.__dict__,
        "command": " ".join(["python", *sys.argv]),
    }
    raw["environment"] = environment(manifest, ort_config)
    try:
        log(f"generating cart DICOMs from {plan.sources} real image(s) in {work}")
        inputs = prepare_inputs(data, work, plan)
        raw["missing_encoders"] = inputs.missing
        raw["inputs"] = {c: [p.name for p in ps] for c, ps in inputs.categories.items()}
        broker = Broker(work / "broker", persistence=False).start()
        try:
            analyzer = make_analyzer(manifest_path, Precision.fp32, ort_config, work)
            log("stages in process")
            stages = measure_stages(analyzer, inputs, plan.repeats)
            detect = measure_detection(work, inputs, plan.repeats, restamper)
            publish = measure_publish(
                analyzer, broker, work, inputs.categories["uncompressed"][0], plan.repeats
            )
            arriving = measure_stages_arriving(analyzer, inputs, work, plan.e2e, restamper, "uncompressed")

            def medians(measured: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
                """Per category, each stage's median, with detection and publishing (measured apart)."""
                return {
                    category: {name: s["median"] for name, s in per_stage.items() if name != "journal"}
                    | {"detect": detect.get(category, {}).get("median"), "publish": publish["median"]}
                    for category, per_stage in measured.items()
                }

            raw["stages_detail"], raw["stages_ms"] = stages, medians(stages)
            raw["stages_arriving_detail"], raw["stages_arriving_ms"] = arriving, medians(arriving)
            raw["detect_ms"], raw["publish_ms"] = detect, publish
            analyzer.backend.close()
            log("fast reading vs full-resolution reading")
            raw["reading_parity"] = measure_reading_parity(manifest_path, work, inputs)
            log("precisions")
            accuracy = [data / r.file for r in dataset.load_records(data) if r.is_cxr and not r.is_dicom]
            raw["precisions"] = measure_precisions(
                manifest_path, ort_config, work, accuracy[: plan.accuracy_images], plan.repeats
            )
            if not plan.quick:
                log("ONNX Runtime thread / optimisation sweep")
                raw["ort_sweep"] = measure_ort_sweep(manifest_path, plan.repeats)
            log("daemon start-up")
            startups = []
            for index in range(plan.startups):
                probe = DaemonRun(work / f"startup{index}", broker, manifest_path, ort_config).start()
                startups.append(probe.startup_ms)
                probe.stop()
            raw["startup_to_ready_ms"] = summary(startups)
            log("daemon end to end")
            daemon = DaemonRun(work / "daemon", broker, manifest_path, ort_config).start()
            try:
                raw["e2e"] = measure_e2e(daemon, inputs, plan.e2e, restamper)
                log(f"daemon backlog of {plan.backlog}")
                backlog = backlog_files(inputs, plan.backlog)
                raw["backlog"] = measure_backlog(daemon, backlog, work, restamper)
                raw["peak_rss_mb"] = daemon.peak_rss_mb()
            finally:
                daemon.stop()
            log("baseline")
            baseline = Baseline(manifest, broker)
            try:
                stride = max(1, len(backlog) // plan.baseline_backlog)
                raw["baseline"] = measure_baseline(
                    baseline, inputs, plan.e2e, backlog[::stride][: plan.baseline_backlog]
                )
            finally:
                baseline.close()
        finally:
            broker.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")
    return assemble(raw)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a handful of files (CI smoke; no targets asserted)"
    )
    parser.add_argument("--json", type=Path, help="output JSON (and OUT.md next to it)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: infer_timing_isolated's child
    parser.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="model manifest (default: the bundled one)"
    )
    parser.add_argument("--data", help="CXR data folder (default: $CXR_DATA or ../shared/data/cxr)")
    parser.add_argument("--backlog", type=int, help="backlog size (default 500; quick 8)")
    parser.add_argument("--workdir", help="where the temporary files go (default: the system temp dir)")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="ONNX Runtime threads (0 = the default config's choice)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated files and daemon logs")
    args = parser.parse_args(argv)
    if args.probe:
        probe = json.loads(args.probe)
        config = OnnxRuntimeConfig.model_validate(probe["ort"])
        print(
            json.dumps(
                infer_timing(Path(probe["model"]), Precision(probe["precision"]), config, probe["repeats"])
            )
        )
        return 0
    if args.json is None:
        parser.error("--json OUT is required")
    if not Path(args.model).exists():
        print(
            f"bench: {args.model}: no such model manifest (train/export it, or pass --model)", file=sys.stderr
        )
        return 2
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        print("bench: mosquitto not found (apt-get install mosquitto)", file=sys.stderr)
        return 2
    # SIGTERM (a timeout, systemd) unwinds like Ctrl-C: the broker and daemons stop, and the gigabytes of
    # generated images under the work folder are removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("bench: interrupted; the broker and daemons were stopped", file=sys.stderr)
        return 130
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    md = args.json.with_name(args.json.name + ".md")
    md.write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
