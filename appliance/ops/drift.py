"""The drift watch: are this cart's recent images and scores distributed as on the validation patients?

The manifest's `drift:` section (tools/training/drift_reference.py) holds, per monitored quantity, fixed bins
and the proportion of the validation patients' observations in each: every published score, the
out-of-distribution score, the gate outcome (read, refused and why, error: the view mix) and two
statistics of the decoded input (mean intensity, contrast = standard deviation). The daemon keeps the
last `drift.window` observations of each quantity and compares them with the reference by the
population stability index

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

where e_i is the reference and a_i the window's proportion in bin i. Both sides add a pseudo-count
(`smoothing`, 0.5 per bin) before normalising, so an empty bin costs a finite amount instead of an
infinite one; with a window of 200 and 10 bins the PSI of an unshifted window is about 0.05.
A quantity is judged once it holds `drift.min_images` observations; it drifts above
`drift.psi_threshold` and clears only below `drift.psi_clear`. Drift is a warning on the status topic,
the metrics and the ward display; it never stops the cart reading (docs/drift.md).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from appliance.config import DriftConfig
from appliance.manifest import DriftQuantity, DriftReference
from appliance.result import Result

log = logging.getLogger(__name__)

OTHER = "other"  # categorical bin for outcomes the validation patients never produced
GATE = "gate"
SMOOTHING = 0.5  # pseudo-count per bin (Jeffreys): a finite cost for an empty bin
Observation = float | str


def gate_outcome(result: Result) -> str:
    """The view mix as the gate saw it: read, refused (with the reason: lateral, not a CXR...), error."""
    if result.status == "ok":
        return "read"
    if result.status == "refused":
        return f"refused: {result.reason or 'unknown'}"
    return "error"


def observations(result: Result, pixels: np.ndarray | None = None) -> dict[str, Observation]:
    """Everything the watch monitors in one result; `pixels` (the decoded image in [0, 1]) adds the
    input statistics. Scores are taken as the Analyzer produced them: the single-image risk, not the
    sequence risk a prior may have replaced it with (the reference has no priors)."""
    out: dict[str, Observation] = {GATE: gate_outcome(result)}
    if pixels is not None and pixels.size:
        out["input.intensity"] = float(pixels.mean())
        out["input.contrast"] = float(pixels.std())
    if result.ood is not None:
        out["ood"] = result.ood.score
    if result.status != "ok":
        return out
    if result.abnormal is not None:
        out["abnormal"] = result.abnormal.score
    for finding in result.findings:
        out[f"findings.{finding.label}"] = finding.score
    if result.severity is not None:
        if result.severity.extent is not None:
            out["severity.extent"] = result.severity.extent
        if result.severity.opacity is not None:
            out["severity.opacity"] = result.severity.opacity
    if result.risk is not None:
        risk = result.risk
        out["risk"] = risk.single_image_score if risk.single_image_score is not None else risk.score
    if result.cardiac is not None:
        out["cardiac.ratio"] = result.cardiac.ratio
    return out


def binner(quantity: DriftQuantity) -> Callable[[Observation], int | None]:
    """The quantity's binning rule for one value: its bin index, or None (an unknown category without
    `other`). The one copy of the rule, shared by bin_counts and the watch's running counts."""
    if quantity.kind == "numeric":
        edges = np.asarray(quantity.edges, dtype=np.float64)

        def numeric(value: Observation) -> int:
            # The method np.searchsorted calls, without its dispatch cost. NaN: the last bin.
            return int(edges.searchsorted(float(value), side="right"))

        return numeric
    index = {c: i for i, c in enumerate(quantity.categories)}
    other = index.get(OTHER)

    def categorical(value: Observation) -> int | None:
        return index.get(str(value), other)

    return categorical


def bin_counts(quantity: DriftQuantity, values: Iterable[Observation]) -> np.ndarray:
    """How many values fall in each of the quantity's bins."""
    counts = np.zeros(len(quantity.proportions), dtype=np.int64)
    bin_of = binner(quantity)
    for value in values:
        slot = bin_of(value)
        if slot is not None:
            counts[slot] += 1
    return counts


def smoothed(counts: np.ndarray, smoothing: float = SMOOTHING) -> np.ndarray:
    return (counts + smoothing) / (counts.sum() + smoothing * len(counts))


def psi(expected: Sequence[float] | np.ndarray, counts: np.ndarray, smoothing: float = SMOOTHING) -> float:
    """Population stability index of observed bin counts against reference proportions."""
    e = np.asarray(expected, dtype=np.float64)
    a = smoothed(counts, smoothing)
    return float(np.sum((a - e) * np.log(a / e)))


def reference_quantity(
    values: Sequence[Observation], bins: int = 10, smoothing: float = SMOOTHING
) -> DriftQuantity | None:
    """Bins and smoothed proportions from validation values; None when they cannot be binned (one value)."""
    if not values:
        return None
    if isinstance(values[0], str):
        categories = sorted({str(v) for v in values} | {OTHER})
        quantity = DriftQuantity(
            kind="categorical",
            categories=categories,
            proportions=[1 / len(categories)] * len(categories),
            n=1,
        )
    else:
        numbers = np.asarray(values, dtype=np.float64)
        # Quantile edges: each bin holds about 1/bins of the reference, so every bin is informative.
        cuts = np.quantile(numbers, np.linspace(0, 1, bins + 1)[1:-1])
        edges = sorted({round(float(c), 6) for c in cuts})
        # An edge at the minimum would leave the lowest bin empty by construction: drop it.
        edges = [e for e in edges if e > numbers.min()]
        if not edges:
            return None
        quantity = DriftQuantity(
            kind="numeric", edges=edges, proportions=[1 / (len(edges) + 1)] * (len(edges) + 1), n=1
        )
    counts = bin_counts(quantity, values)
    proportions = [round(float(p), 6) for p in smoothed(counts, smoothing)]
    proportions[-1] = round(1.0 - sum(proportions[:-1]), 6)  # exact sum after rounding
    return quantity.model_copy(update={"proportions": proportions, "n": len(values)})


class DriftWatch:
    """Rolling windows per quantity, judged against the reference after every observation.

    Each window's bin counts are kept alongside it (+1 on append, -1 for the value the full window
    evicts), so a judgement costs one PSI, not a re-binning of the whole window; windows are filled
    only through `_append`, which keeps the two together."""

    def __init__(self, config: DriftConfig, reference: DriftReference | None) -> None:
        self.config = config
        self.reference = reference if config.enabled else None
        quantities = self.reference.quantities if self.reference is not None else {}
        self.windows: dict[str, deque[Observation]] = {
            name: deque(maxlen=config.window) for name in quantities
        }
        # counts[name] == bin_counts(quantity, windows[name]) at all times.
        self.counts: dict[str, np.ndarray] = {
            name: np.zeros(len(q.proportions), dtype=np.int64) for name, q in quantities.items()
        }
        self._bin_of = {name: binner(q) for name, q in quantities.items()}
        # Converted once: psi() takes the array as it is, so the PSI is the same float for float.
        self._expected = {name: np.asarray(q.proportions, dtype=np.float64) for name, q in quantities.items()}
        self.psi: dict[str, float] = {}  # only judged quantities (window >= min_images)
        self._drifted: set[str] = set()

    @property
    def active(self) -> bool:
        return self.reference is not None

    @property
    def drifted(self) -> list[str]:
        return sorted(self._drifted)

    def _append(self, name: str, value: Observation) -> None:
        window = self.windows[name]
        counts = self.counts[name]
        bin_of = self._bin_of[name]
        slot = bin_of(value)  # first: a value that cannot be binned raises before anything changes
        if len(window) == window.maxlen:
            gone = bin_of(window[0])
            if gone is not None:
                counts[gone] -= 1
        window.append(value)
        if slot is not None:
            counts[slot] += 1

    def observe(self, values: Mapping[str, Observation], *, judge: bool = True) -> bool:
        """Add one image's observations; True when the set of drifted quantities changed."""
        touched = []
        for name, value in values.items():
            if name in self.windows:
                self._append(name, value)
                touched.append(name)
        return self.judge(touched) if judge else False

    def rebuild(self, results: Iterable[Result]) -> int:
        """Refill the windows from stored results (the journal at start), oldest first; returns how
        many were used. Stored results carry no pixels, so the input statistics start empty."""
        used = 0
        for result in results:
            self.observe(observations(result), judge=False)
            used += 1
        self.judge(self.windows)
        return used

    def judge(self, names: Iterable[str]) -> bool:
        if self.reference is None:
            return False
        before = set(self._drifted)
        for name in names:
            if len(self.windows[name]) < self.config.min_images:
                self.psi.pop(name, None)
                continue
            value = psi(self._expected[name], self.counts[name], self.reference.smoothing)
            self.psi[name] = value
            if value > self.config.psi_threshold:
                self._drifted.add(name)
            elif value < self.config.psi_clear:
                self._drifted.discard(name)
        return before != self._drifted

    def describe(self) -> str:
        """For the log: each drifted quantity with its PSI."""
        return ", ".join(f"{name} (PSI {self.psi.get(name, float('nan')):.2f})" for name in self.drifted)
