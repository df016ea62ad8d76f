"""The drift watch: PSI and windows on numbers, the manifest's reference, and the real daemon on real
chest X-rays (real Mosquitto, real ONNX Runtime, the bundled model and its validation reference).

The end-to-end test feeds a shuffled mix of the model's validation images (no alarm), then
low-contrast versions of other validation images (a real acquisition shift: drift raised on the
retained status and the metrics, naming the quantities, while the cart keeps reading), restarts the
daemon (the windows come back from the journal), then normal images again (drift cleared)."""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from appliance.config import AppConfig, DriftConfig
from appliance.manifest import DriftQuantity, DriftReference, load_manifest
from appliance.ops.drift import OTHER, DriftWatch, Observation, bin_counts, psi, reference_quantity
from tests.ops.test_metrics import samples, scrape, value
from testsupport import data
from testsupport.daemon import STATUS_TOPIC, DaemonProcess, results, wait_until
from testsupport.mosquitto import Broker, Subscriber, free_port
from tools.training.drift_reference import build_reference, write_reference

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "engines" / "cxr-lite0" / "manifest.yaml"


# --- numbers ------------------------------------------------------------------------------------------


def test_psi_is_zero_for_the_reference_itself_and_finite_for_an_empty_bin() -> None:
    assert psi([0.25, 0.25, 0.25, 0.25], np.array([50, 50, 50, 50])) == pytest.approx(0.0, abs=1e-12)
    # Everything in one bin: the other bin's 0 becomes 0.5 / 11 (pseudo-count 0.5), not log(0).
    a = np.array([10.5, 0.5]) / 11
    expected = float(np.sum((a - 0.5) * np.log(a / 0.5)))
    assert psi([0.5, 0.5], np.array([10, 0])) == pytest.approx(expected)
    assert math.isfinite(expected) and expected > 0.25


def test_reference_bins_hold_equal_shares_and_ties_do_not_make_empty_bins() -> None:
    rng = np.random.default_rng(0)
    uniform = reference_quantity(list(rng.uniform(size=5000)), bins=10)
    assert uniform is not None and uniform.kind == "numeric" and len(uniform.edges) == 9
    assert all(p == pytest.approx(0.1, abs=0.01) for p in uniform.proportions)
    # Half the scores exactly 0 (rounded payload scores): no edge at the minimum, no empty lowest bin.
    tied = reference_quantity([0.0] * 500 + list(rng.uniform(size=500)), bins=10)
    assert tied is not None and tied.edges[0] > 0
    assert tied.proportions[0] == pytest.approx(0.5, abs=0.01)
    assert reference_quantity([0.3] * 100) is None  # nothing to bin
    gate = reference_quantity(["read"] * 90 + ["refused: lateral view"] * 10)
    assert gate is not None and OTHER in gate.categories
    # An outcome the validation patients never produced counts as `other`.
    counts = bin_counts(gate, ["read", "error", "refused: lateral view"])
    assert counts[gate.categories.index(OTHER)] == 1 and counts.sum() == 3


def make_watch(**config: Any) -> DriftWatch:
    rng = np.random.default_rng(1)
    quantity = reference_quantity(list(rng.normal(0.5, 0.1, size=4000)), bins=10)
    assert quantity is not None
    reference = DriftReference(source="test", images=4000, quantities={"score": quantity})
    return DriftWatch(DriftConfig(**config), reference)


def test_watch_judges_only_full_enough_windows_and_clears_with_hysteresis() -> None:
    watch = make_watch(window=200, min_images=100, psi_threshold=0.25, psi_clear=0.1)
    rng = np.random.default_rng(2)
    for x in rng.normal(0.5, 0.1, size=99):
        assert not watch.observe({"score": float(x), "unknown": 1.0})
    assert "score" not in watch.psi  # 99 < min_images: not judged at all
    for x in rng.normal(0.5, 0.1, size=101):
        watch.observe({"score": float(x)})
    assert watch.psi["score"] < 0.1 and watch.drifted == []

    changed = [watch.observe({"score": float(x)}) for x in rng.normal(0.8, 0.1, size=200)]
    assert watch.drifted == ["score"] and sum(changed) == 1 and watch.psi["score"] > 1.0
    # Back to normal: the PSI falls through the band between clear and threshold while still drifted.
    seen_in_band = False
    for x in rng.normal(0.5, 0.1, size=200):
        watch.observe({"score": float(x)})
        if 0.1 <= watch.psi["score"] <= 0.25:
            seen_in_band = True
            assert watch.drifted == ["score"]
    assert seen_in_band and watch.psi["score"] < 0.1 and watch.drifted == []


def test_config_refuses_inconsistent_drift_settings_and_has_stated_defaults() -> None:
    defaults = AppConfig().drift
    assert (defaults.window, defaults.min_images, defaults.psi_threshold, defaults.psi_clear) == (
        200,
        100,
        0.25,
        0.1,
    )
    with pytest.raises(ValidationError, match="min_images"):
        DriftConfig(window=50, min_images=60)
    with pytest.raises(ValidationError, match="psi_clear"):
        DriftConfig(psi_threshold=0.2, psi_clear=0.2)
    assert not DriftWatch(DriftConfig(enabled=False), make_watch().reference).active


def test_manifest_reference_is_validated_and_the_bundled_model_carries_one() -> None:
    with pytest.raises(ValidationError, match="proportions"):
        DriftQuantity(kind="numeric", edges=[0.5], proportions=[0.3, 0.3, 0.4], n=10)
    with pytest.raises(ValidationError, match="sum to 1"):
        DriftQuantity(kind="numeric", edges=[0.5], proportions=[0.3, 0.3], n=10)
    drift = load_manifest(BUNDLED).drift
    assert drift is not None and drift.images >= 1000
    assert {"abnormal", "ood", "gate", "input.intensity", "input.contrast"} <= set(drift.quantities)


def test_the_tool_writes_the_section_and_keeps_the_rest_of_the_manifest(model: Path) -> None:
    rng = np.random.default_rng(3)
    values: dict[str, Sequence[Observation]] = {
        "abnormal": [float(x) for x in rng.uniform(size=300)],
        "gate": ["read"] * 280 + ["refused: lateral view"] * 20,
        "risk": [float(x) for x in rng.uniform(size=10)],  # too few: left out
    }
    before = load_manifest(model)
    write_reference(model, build_reference(values, 300, "test", bins=10))
    after = load_manifest(model)
    assert after.drift is not None and set(after.drift.quantities) == {"abnormal", "gate"}
    assert after.model_copy(update={"drift": None}) == before


# --- the real daemon ---------------------------------------------------------------------------------


def validation_images() -> list[Path]:
    """The bundled model's validation patients' images (split.json), shuffled with a fixed seed."""
    patients = set(json.loads((BUNDLED.parent / "split.json").read_text())["validation"])
    files = [data.cxr_data() / row["file"] for row in data.rows() if row["patient_id"] in patients]
    random.Random(7).shuffle(files)
    return files


def low_contrast(source: Path, target: Path) -> None:
    """The same radiograph with its grey range squeezed to a third, lifted to mid-grey (a washed-out
    detector or a wrong window): a real image, shifted the way a ward's acquisition might shift."""
    pixels = np.asarray(Image.open(source).convert("L"), dtype=np.float32)
    Image.fromarray((pixels * 0.35 + 0.45 * 255).clip(0, 255).astype(np.uint8)).save(target)


def feed(daemon: DaemonProcess, files: list[Path], tag: str, shift: bool = False) -> None:
    staging = daemon.workdir / f"staging-{tag}"
    staging.mkdir()
    for index, source in enumerate(files):
        name = f"{tag}-{index:04d}{'.png' if shift else source.suffix}"
        if shift:
            low_contrast(source, staging / name)
        else:
            shutil.copyfile(source, staging / name)
        (staging / name).rename(daemon.inbox / name)  # appears whole


def last_status(sub: Subscriber) -> dict[str, Any]:
    return dict(sub.on_topic(STATUS_TOPIC)[-1].json())


def drift_metrics(port: int) -> tuple[dict[str, float], dict[str, float]]:
    found = samples(scrape(port))
    flags = {labels["quantity"]: v for labels, v in found.get("cxr_drift", [])}
    psis = {labels["quantity"]: v for labels, v in found.get("cxr_drift_psi", [])}
    return flags, psis


def test_daemon_raises_drift_on_a_real_shift_and_not_on_validation_images(
    broker: Broker, daemons: Callable[..., DaemonProcess]
) -> None:
    port = free_port()
    # The shipped defaults (window 200, min_images 100, PSI 0.25 / clear 0.1): the test checks them.
    daemon = daemons(
        broker, BUNDLED, metrics={"enabled": True, "port": port}, mqtt={"publish_heatmap": False}
    )
    images = validation_images()
    mix, shifted, after = images[:200], images[200:400], images[400:650]
    with Subscriber(broker, ["cxr/+/+/result", STATUS_TOPIC]) as sub:
        daemon.start(timeout=120)

        def done(count: int) -> Callable[[], bool]:
            return lambda: len(results(sub)) >= count

        # 1. No shift: a shuffled mix of validation images never raises drift.
        feed(daemon, mix, "mix")
        assert wait_until(done(200), timeout=240), daemon.log()[-3000:]
        flags, psis = drift_metrics(port)
        assert all(s.json()["drift"] == [] for s in sub.on_topic(STATUS_TOPIC)), daemon.log()[-3000:]
        assert set(flags) >= {"abnormal", "ood", "input.contrast", "gate"} and not any(flags.values())
        assert psis and max(psis.values()) < 0.25, psis
        print("no shift PSI:", {k: round(v, 3) for k, v in sorted(psis.items())})

        # 2. Real shift: low-contrast radiographs. Drift is named on the status and the metrics; the
        # cart keeps reading (a warning, not a fault).
        feed(daemon, shifted, "low", shift=True)
        assert wait_until(done(400), timeout=240), daemon.log()[-3000:]
        assert wait_until(lambda: "input.contrast" in last_status(sub)["drift"], timeout=10)
        status = last_status(sub)
        assert status["state"] == "online" and status["accepting"] is True
        flags, psis = drift_metrics(port)
        assert flags["input.contrast"] == 1 and psis["input.contrast"] > 0.25
        assert {q for q, f in flags.items() if f} == set(status["drift"])
        print("shift PSI:", {k: round(v, 3) for k, v in sorted(psis.items())})
        print("drifted:", status["drift"])
        assert "drift: recent images differ from validation in" in daemon.log()
        found = samples(scrape(port))
        assert value(found, "cxr_accepting") == 1

        # 3. Restart: the score windows come back from the journal (stored results have no pixels,
        # so the input statistics start empty and are not judged until they refill).
        assert daemon.stop() == 0
        seen = len(sub.on_topic(STATUS_TOPIC))
        daemon.start(timeout=120)
        assert wait_until(lambda: len(sub.on_topic(STATUS_TOPIC)) > seen, timeout=10)
        assert last_status(sub)["state"] == "online"
        rebuilt = set(last_status(sub)["drift"])
        score_drift = set(status["drift"]) - {"input.contrast", "input.intensity"}
        assert score_drift and rebuilt == score_drift, (rebuilt, status["drift"])
        assert "stored result(s) reloaded" in daemon.log()

        # 4. Normal images again: every window turns over and drift clears.
        feed(daemon, after, "after")
        assert wait_until(done(650), timeout=300), daemon.log()[-3000:]
        assert wait_until(lambda: last_status(sub)["drift"] == [], timeout=10), last_status(sub)
        flags, psis = drift_metrics(port)
        assert not any(flags.values()), psis
        print("after PSI:", {k: round(v, 3) for k, v in sorted(psis.items())})
    assert daemon.stop() == 0
