"""The soak at CI size (tools/quality/soak.py --quick): 60 real images (a third of the DICOMs by C-STORE), 3 broker
and 3 daemon SIGKILLs at seeded random moments, 20 mutated files and the hostile codestreams through the
daemon (half of the latter by C-STORE) and 200 through read_image; nothing lost, nothing twice, order per
bed kept, databases intact, outbox drained, no patient name/ID in any payload."""

from __future__ import annotations

import json
from pathlib import Path

from tools.quality.soak import QUICK, parse_args, soak
from tools.quality.soak_report import markdown, passed


def test_quick_soak_loses_nothing(tmp_path: Path) -> None:
    args = parse_args(["--quick", "--workdir", str(tmp_path / "soak"), "--json", str(tmp_path / "soak.json")])
    report = soak(args)
    summary = json.dumps({k: v for k, v in report.items() if k not in ("fuzz", "last_status")}, indent=1)
    assert report["images"] == QUICK["images"]
    assert report["kills"] == QUICK["daemon_kills"] and report["broker_restarts"] == QUICK["broker_kills"]
    assert report["lost"] == 0 and report["duplicates"] == 0, summary
    assert report["daemon_crashes"] == 0 and report["fuzz_crashes"] == 0, summary
    assert report["fuzz_cases"] == QUICK["fuzz"]
    assert report["order_violations"] == 0 and report["images_not_accounted_count"] == 0, summary
    assert report["integrity"] == {"journal": "ok", "spool": "ok", "outbox": "ok"}
    assert report["outbox_pending"] == 0 and not report["phi_leaks"], summary
    assert report["phi_strings_checked"] >= 40  # the made-up names/IDs of the DICOMs, the real ones
    # Every image gave a result; the fuzz files were refused with reasons (or decoded, a few).
    assert report["results"] >= QUICK["images"] and report["quarantined"] >= 1, summary
    assert report["peak_rss_mb"] > 0
    # The network path: a third of the DICOMs came by C-STORE (through the kills), and no hostile
    # codestream sent that way was answered Success.
    assert report["cstore_images"] >= QUICK["images"] // 6, summary
    assert report["cstore_hostile"] >= 4 and report["cstore_hostile_accepted"] == 0, summary
    assert passed(report), summary
    assert "PASSED" in markdown(report)
