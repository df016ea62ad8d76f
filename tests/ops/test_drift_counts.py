"""The drift watch's running bin counts: after every observation and after a rebuild they equal a fresh
bin_counts of the window, and the PSI and judgements equal those computed from scratch, bit for bit."""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Mapping
from typing import cast

import numpy as np
import pytest

from appliance.config import DriftConfig
from appliance.manifest import DriftQuantity, DriftReference
from appliance.ops.drift import OTHER, DriftWatch, Observation, bin_counts, binner, observations, psi
from appliance.result import Result
from tests.display.results import make_result

EDGES = [0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9]
CATEGORIES = sorted(["read", "error", "refused: lateral view", OTHER])


def numeric(edges: list[float] = EDGES) -> DriftQuantity:
    return DriftQuantity(
        kind="numeric", edges=edges, proportions=[1 / (len(edges) + 1)] * (len(edges) + 1), n=100
    )


def categorical(categories: list[str]) -> DriftQuantity:
    return DriftQuantity(
        kind="categorical", categories=categories, proportions=[1 / len(categories)] * len(categories), n=100
    )


def reference() -> DriftReference:
    return DriftReference(
        source="test",
        images=100,
        quantities={
            "score": numeric(),
            "wide": numeric([-1e9, 0.0, 1e-300, 1e9]),
            "gate": categorical(CATEGORIES),
            "closed": categorical(["a", "b"]),  # no `other`: unknown values fall in no bin
        },
    )


def numeric_value(rng: random.Random, shift: float) -> Observation:
    pick = rng.random()
    if pick < 0.2:
        return rng.choice([*EDGES, -1e9, 0.0, -0.0, 1e-300, 1e9])  # exactly on an edge
    if pick < 0.25:
        return rng.choice([math.nan, math.inf, -math.inf])
    if pick < 0.3:
        # Values of other types: bin_counts takes anything float() takes.
        odd: list[Observation] = [0, 1, True, False, "0.5", "0.33", cast(float, np.float32(0.4))]
        return rng.choice(odd)
    return rng.gauss(0.5 + shift, 0.2)


def categorical_value(rng: random.Random, shift: float) -> Observation:
    if rng.random() < 0.1 + shift:
        unknown: list[Observation] = ["refused: not a cxr", "b", "unknown", "", "READ", 1.0, "a"]
        return rng.choice(unknown)
    return rng.choice([*CATEGORIES, "a", "read", "read"])


def assert_consistent(watch: DriftWatch, drifted: set[str]) -> None:
    """Counts, PSI and the drifted set against a recomputation from the windows alone."""
    assert watch.reference is not None
    for name, window in watch.windows.items():
        quantity = watch.reference.quantities[name]
        fresh = bin_counts(quantity, window)
        counts = watch.counts[name]
        assert counts.dtype == fresh.dtype and np.array_equal(counts, fresh), name
        if len(window) < watch.config.min_images:
            assert name not in watch.psi
            continue
        value = psi(quantity.proportions, fresh, watch.reference.smoothing)
        assert watch.psi[name] == value, name
    assert set(watch.drifted) == drifted


def judged_after(watch: DriftWatch, values: Mapping[str, Observation], drifted: set[str]) -> set[str]:
    """The drifted set once `values` are observed, from copies of the windows: the hysteresis rule
    applied to PSIs recomputed with bin_counts."""
    assert watch.reference is not None
    after = set(drifted)
    for name, value in values.items():
        if name not in watch.windows:
            continue
        window = deque(watch.windows[name], maxlen=watch.windows[name].maxlen)
        window.append(value)
        if len(window) < watch.config.min_images:
            continue
        quantity = watch.reference.quantities[name]
        psi_value = psi(quantity.proportions, bin_counts(quantity, window), watch.reference.smoothing)
        if psi_value > watch.config.psi_threshold:
            after.add(name)
        elif psi_value < watch.config.psi_clear:
            after.discard(name)
    return after


def test_running_counts_and_psi_equal_a_recomputation_after_every_observation() -> None:
    rng = random.Random(7)
    watch = DriftWatch(DriftConfig(window=40, min_images=15), reference())
    drifted: set[str] = set()
    flips = 0
    for step in range(4000):
        shift = 0.4 if (step // 500) % 2 else 0.0  # phases that raise and clear drift
        values: dict[str, Observation] = {"unmonitored": 1.0}
        if rng.random() < 0.9:
            values["score"] = numeric_value(rng, shift)
        if rng.random() < 0.7:
            values["wide"] = numeric_value(rng, shift)
        if rng.random() < 0.95:
            values["gate"] = categorical_value(rng, shift)
        if rng.random() < 0.5:
            values["closed"] = categorical_value(rng, shift)
        expected = judged_after(watch, values, drifted)
        changed = watch.observe(values)
        assert changed == (expected != drifted)
        flips += changed
        drifted = expected
        assert_consistent(watch, drifted)
    assert flips >= 4  # the stream did raise and clear drift


def test_rebuild_fills_counts_consistently_and_observing_continues_from_them() -> None:
    rng = random.Random(3)
    quantities = {
        "gate": categorical(CATEGORIES),
        "abnormal": numeric(),
        "risk": numeric(),
        "findings.Lung Opacity": numeric(),
    }
    ref = DriftReference(source="test", images=100, quantities=quantities)

    def result(shift: float) -> Result:
        status = rng.choice(["ok"] * 8 + ["refused", "error"])
        score = min(max(rng.gauss(0.5 + shift, 0.2), 0.0), 1.0)
        if rng.random() < 0.1:
            score = rng.choice(EDGES)
        return make_result(
            "Bay 1",
            None,
            "text",
            heatmap=False,
            status=status,
            reason="lateral view" if status == "refused" else None,
            abnormal=score,
            risk=rng.choice([None, score, 1.0 - score]),
            findings=[("Lung Opacity", score, 0.5)] if rng.random() < 0.6 else None,
        )

    stored = [result(0.3) for _ in range(150)]
    watch = DriftWatch(DriftConfig(window=50, min_images=20), ref)
    assert watch.rebuild(stored) == 150
    # One judgement at the end of the rebuild, from an empty drifted set.
    assert_consistent(watch, {n for n in watch.windows if watch.psi.get(n, 0.0) > watch.config.psi_threshold})
    assert watch.drifted  # the shifted journal is judged as such
    drifted = set(watch.drifted)
    for _ in range(200):
        values = observations(result(0.0))
        expected = judged_after(watch, values, drifted)
        assert watch.observe(values) == (expected != drifted)
        drifted = expected
        assert_consistent(watch, drifted)


def test_binner_is_searchsorted_right_and_category_or_other() -> None:
    quantity = numeric([-1.0, 0.0, 0.5, 2.0])
    values = np.array([-2.0, -1.0, -0.0, 0.0, 0.25, 0.5, 1.0, 2.0, 3.0, math.nan, math.inf, -math.inf])
    bin_of = binner(quantity)
    expected = np.searchsorted(np.asarray(quantity.edges), values, side="right")
    assert [bin_of(float(v)) for v in values] == expected.tolist()
    assert bin_of(math.nan) == len(quantity.edges)  # NaN sorts last
    assert bin_of("0.5") == 3 and bin_of(True) == 3 and bin_of(False) == 2
    gate = binner(categorical(CATEGORIES))
    assert gate("read") == CATEGORIES.index("read") and gate("new reason") == CATEGORIES.index(OTHER)
    assert binner(categorical(["a", "b"]))("c") is None


def test_a_value_that_cannot_be_binned_changes_nothing() -> None:
    watch = DriftWatch(DriftConfig(window=20, min_images=10), reference())
    for i in range(25):
        watch.observe({"score": i / 25})
    window, counts = list(watch.windows["score"]), watch.counts["score"].copy()
    with pytest.raises(ValueError):
        watch.observe({"score": "not a number"})
    assert list(watch.windows["score"]) == window and np.array_equal(watch.counts["score"], counts)
