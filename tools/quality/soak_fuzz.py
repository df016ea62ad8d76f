"""The reader fuzz of the soak (tools/quality/soak.py): tools/quality/fuzz.py in child processes, restarted
after a case that kills one, so such a case is counted and named as a crash instead of ending the run."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def fuzz_in_children(count: int, seed: int, workdir: Path) -> dict[str, Any]:
    """tools/quality/fuzz.py over cases 0..count-1 in child processes; a case after which the child died
    (abort, segfault, hang past its limit) is a crash, and the next child resumes after it."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "cases.jsonl"
    start, deaths = 0, []
    while start < count:
        options = {"--cases": count, "--seed": seed, "--start": start, "--log": log, "--workdir": workdir}
        proc = subprocess.run(
            [sys.executable, "-m", "tools.quality.fuzz", *(f"{k}={v}" for k, v in options.items())],
            capture_output=True,
            text=True,
        )
        lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        started = [line["start"] for line in lines if "start" in line]
        finished = {line["name"] for line in lines if "status" in line}
        unfinished = [name for name in started if name not in finished]
        if proc.returncode in (0, 1) and not unfinished:
            break
        if not unfinished:  # died before its first case: nothing to resume from
            deaths.append({"name": f"fuzz.py start {start}", "reason": f"exit {proc.returncode}"})
            break
        deaths.append({"name": unfinished[-1], "reason": f"process died ({proc.returncode})"})
        deaths[-1]["detail"] = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else ""
        start = int(unfinished[-1].rsplit("#", 1)[1]) + 1
    outcomes = [line for line in lines if "status" in line]
    reasons = collections.Counter(o["reason"] for o in outcomes if o["status"] == "rejected")
    crashes = [o for o in outcomes if o["status"] == "crash"] + deaths
    slowest: dict[str, Any] = max(outcomes, key=lambda o: o["seconds"], default={"seconds": 0.0, "name": ""})
    return {
        "cases": len(outcomes) + len(deaths),
        "decoded": sum(o["status"] == "decoded" for o in outcomes),
        "rejected": sum(o["status"] == "rejected" for o in outcomes),
        "crashes": [f"{c['name']}: {c['reason']}: {c.get('detail', '')}" for c in crashes],
        "reasons": dict(reasons.most_common()),
        "mutations": dict(
            sorted(collections.Counter(o["mutation"].split("->")[0] for o in outcomes).items())
        ),
        "slowest_s": round(slowest["seconds"], 3),
        "slowest_case": slowest["name"],
        "traced_peak_mb": round(max((o["traced_peak_mb"] for o in outcomes), default=0.0), 1),
    }
