"""Analyzer.analyze over more jobs than one batch: the next batch is read while the current one is
inferred, and the results are exactly those of one image at a time, in the order given."""

from __future__ import annotations

from pathlib import Path

from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.config import AppConfig
from appliance.manifest import Precision, load_manifest
from appliance.pipeline import Analyzer, Job
from testsupport import data, tiny_models


def test_prefetched_batches_match_one_at_a_time(tmp_path: Path) -> None:
    manifest = load_manifest(tiny_models.xrv_like(tmp_path / "xrv"))
    backend = OnnxRuntimeBackend(manifest, Precision.fp32, OnnxRuntimeConfig(intra_op_threads=1), max_batch=2)
    analyzer = Analyzer(AppConfig(), manifest, backend)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    paths = [*data.real_dicoms(), data.first(source="txv", view="PA", modality="X-ray"), broken]
    paths += [data.first(source="cohen", view="PA", modality="X-ray")]

    def jobs() -> list[Job]:
        return [Job(path=p, image_id=f"id{i}", source="test") for i, p in enumerate(paths)]

    together = analyzer.analyze(jobs())  # 6 jobs, batches of 2: three batches, two of them prefetched
    alone = [analyzer.analyze([job])[0] for job in jobs()]
    assert [r.image.image_id for r in together] == [f"id{i}" for i in range(len(paths))]
    assert [r.status for r in together] == [r.status for r in alone]
    assert together[len(paths) - 2].status == "error"
    for a, b in zip(together, alone, strict=True):
        assert [(f.label, round(f.score, 6)) for f in a.findings] == [
            (f.label, round(f.score, 6)) for f in b.findings
        ]
        assert set(a.timings_ms) == set(b.timings_ms)
