"""Results for the display tests, and a cart process that publishes them.

`make_result` builds schema-valid payloads with appliance.result's classes. `Cart.publish` takes
Result JSON lines, so the same tests can be fed `cxr-appliance process FILE --json` output instead.
"""

from __future__ import annotations

import base64
import contextlib
import io
import subprocess
import sys
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from appliance.result import Heatmap, ImageInfo, Provenance, Result, Risk, Severity, Trend
from tests.support.mosquitto import Broker

CART_SCRIPT = Path(__file__).with_name("cart_process.py")
REPO = Path(__file__).resolve().parents[2]


def iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")


def heatmap_png(width: int = 96, height: int = 112, hot: tuple[float, float] = (0.3, 0.7)) -> str:
    """A grey map with a blob per given lung (x positions as a share of the width), as base64 PNG."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    grey = np.zeros((height, width), np.float32)
    for i, cx in enumerate(hot):
        strength = 1.0 if i == 0 else 0.6
        grey += strength * np.exp(
            -(((xx - cx * width) / (0.14 * width)) ** 2 + ((yy - 0.62 * height) / (0.2 * height)) ** 2)
        )
    buf = io.BytesIO()
    Image.fromarray(np.clip(grey * 255, 0, 255).astype(np.uint8), "L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


PROVENANCE = Provenance(
    model="cxr-lite0",
    model_version="test",
    onnx_sha256="0" * 64,
    backend="onnxruntime-cpu",
    precision="fp32",
    appliance_version="0.1.0",
)


def make_result(
    location: str,
    triage: str | None,
    text: str,
    *,
    site: str = "ward7",
    device_id: str = "cart-1",
    patient_key: str | None = None,
    acquired: datetime | None = None,
    extent: float | None = None,
    opacity: float | None = None,
    risk: float | None = None,
    prior: Result | None = None,
    heatmap: bool = True,
    status: str = "ok",
    reason: str | None = None,
) -> Result:
    acquired = acquired or datetime.now(timezone.utc) - timedelta(minutes=3)
    image_id = uuid.uuid4().hex
    trend = None
    if prior is not None:
        assert prior.image.acquired_at is not None
        before = datetime.fromisoformat(prior.image.acquired_at)
        trend = Trend(
            prior_image_id=prior.image.image_id,
            prior_acquired_at=prior.image.acquired_at,
            interval_hours=round((acquired - before).total_seconds() / 3600, 2),
            extent_before=prior.severity.extent if prior.severity else None,
            extent_now=extent,
            opacity_before=prior.severity.opacity if prior.severity else None,
            opacity_now=opacity,
            risk_before=prior.risk.score if prior.risk else None,
            risk_now=risk,
            direction="worse"
            if extent is not None
            and prior.severity
            and prior.severity.extent is not None
            and extent > prior.severity.extent
            else "better",
        )
    fields: dict[str, Any] = {}
    if status == "ok":
        fields = {
            "severity": Severity(extent=extent, opacity=opacity)
            if extent is not None and opacity is not None
            else None,
            "risk": Risk(score=risk, threshold=0.5, positive=risk >= 0.5) if risk is not None else None,
            "heatmap": Heatmap(label="Lung Opacity", width=96, height=112, png_base64=heatmap_png())
            if heatmap
            else None,
            "trend": trend,
        }
    return Result(
        message_id=uuid.uuid4().hex,
        created_at=iso(acquired + timedelta(seconds=20)),
        site=site,
        device_id=device_id,
        location=location,
        patient_key=patient_key,
        image=ImageInfo(
            image_id=image_id, source="inbox", format="dicom", modality="DX", acquired_at=iso(acquired)
        ),
        status=status,
        reason=reason,
        triage=triage,
        text=text,
        provenance=PROVENANCE,
        **fields,
    )


class Cart:
    """cart_process.py as a child process: `publish` feeds it Result JSON lines, `kill` fires its will."""

    def __init__(
        self,
        broker: Broker,
        *,
        site: str = "ward7",
        device_id: str = "cart-1",
        location: str = "Bay 1",
        auth: tuple[str, str] | None = None,
        prefix: str = "cxr",
    ) -> None:
        args = [broker.host, str(broker.port), prefix, site, device_id, location, *(auth or ())]
        self.proc = subprocess.Popen(
            [sys.executable, str(CART_SCRIPT), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self._expect("online")

    def _expect(self, line: str) -> None:
        assert self.proc.stdout is not None
        got = self.proc.stdout.readline().strip()
        if got != line:
            self.kill()
            raise AssertionError(f"cart process said {got!r}, expected {line!r}")

    def publish(self, lines: Iterable[str | Result]) -> None:
        """Publish Result JSON lines (or Results) and return once the broker acknowledged each."""
        assert self.proc.stdin is not None
        for line in lines:
            text = line.to_json() if isinstance(line, Result) else line.strip()
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
            self._expect(f"published {Result.model_validate_json(text).message_id}")

    def kill(self) -> None:
        """SIGKILL: the TCP connection dies without DISCONNECT, so the broker publishes the last will."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin:
            self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.kill()
