"""The README's main job (tools/run.sh runs tools.deploy.demo after the setup): a real broker, the real
daemon on the bundled model, a real DICOM; the demo's own broker is gone when it ends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tools.deploy.demo import listening

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_prints_the_result_that_went_out_and_leaves_no_broker_behind() -> None:
    had_broker = listening(1883)
    done = subprocess.run(
        [sys.executable, "-m", "tools.deploy.demo", "--once"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "==> the message that went out on cxr/demo/cart-1/result:" in out
    body = out.split("result:\n", 1)[1].split("\n\n==> TEXT:", 1)[0]
    payload = json.loads(body)
    assert payload["status"] == "ok" and payload["disclaimer"] == "Not for diagnostic use"
    assert payload["provenance"]["backend"] == "onnxruntime"
    assert listening(1883) == had_broker  # the broker it started (if any) stopped with it
