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

from appliance.result import (
    CardiacSize,
    Finding,
    Heatmap,
    ImageInfo,
    Provenance,
    Result,
    Risk,
    Score,
    Sentence,
    Severity,
    Trend,
    Zone,
)
from testsupport.mosquitto import Broker

CART_SCRIPT = Path(__file__).with_name("cart_process.py")
REPO = Path(__file__).resolve().parents[2]
# Sentences a tile does not lead with (the page's NOT_KEY): the view sentence and the disclaimer.
NOT_KEY = frozenset({"dicom.ViewPosition", "view.frontal", "disclaimer"})


def key_sentence(result: Result | dict[str, Any]) -> str:
    """What a tile leads with: the first sentence after the view sentence, else the whole text."""
    data = result.model_dump() if isinstance(result, Result) else result
    for sentence in data.get("sentences") or []:
        if sentence["source"] not in NOT_KEY and sentence["text"].strip():
            return str(sentence["text"])
    return str(data["text"])


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
    sentences: list[tuple[str, str]] | None = None,
    findings: list[tuple[str, float, float]] | None = None,
    abnormal: float | None = None,
    cardiac: tuple[float, float] | None = None,
    projection_caveat: bool = False,
    zones: list[tuple[str, str, float]] | None = None,
    not_assessed: list[str] | None = None,
) -> Result:
    """A schema-valid Result. `sentences` as (text, source) pairs; with them `text` may be "" and is
    then their join, as the appliance makes it. `findings` (label, score, threshold), `cardiac`
    (ratio, threshold), `zones` (side, level, involvement): only what is given is published."""
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
    if sentences is not None:
        fields["sentences"] = [Sentence(text=t, source=src) for t, src in sentences]
        text = text or " ".join(t for t, _ in sentences)
    if not_assessed:
        fields["not_assessed"] = not_assessed
    if status == "ok":
        fields |= {
            "severity": Severity(extent=extent, opacity=opacity)
            if extent is not None or opacity is not None
            else None,
            "risk": Risk(score=risk, threshold=0.5, positive=risk >= 0.5) if risk is not None else None,
            "heatmap": Heatmap(label="Lung Opacity", width=96, height=112, png_base64=heatmap_png())
            if heatmap
            else None,
            "trend": trend,
            "findings": [
                Finding(label=label, score=score, threshold=th, positive=score >= th)
                for label, score, th in findings or []
            ],
            "abnormal": Score(score=abnormal, threshold=0.5, positive=abnormal >= 0.5)
            if abnormal is not None
            else None,
            "cardiac": CardiacSize(
                ratio=cardiac[0],
                threshold=cardiac[1],
                enlarged=cardiac[0] >= cardiac[1],
                projection_caveat=projection_caveat,
            )
            if cardiac is not None
            else None,
            "zones": [
                Zone(side=side, level=level, involvement=inv, positive=inv >= 0.3)
                for side, level, inv in zones or []
            ],
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
