"""Percentiles of a mask's row or column indices, from its per-line pixel counts.

`np.percentile(np.nonzero(mask)[1], q)` lists one index per mask pixel and partitions them. The same
order statistics come from the cumulative count per column (or row): the k-th smallest index is where
the cumulative count first exceeds k. numpy's 'linear' rule is then followed step for step, so the
values equal np.percentile's to the last bit (the crop box and the ratio are rounded afterwards, where
one ulp could flip a digit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def line_counts(mask: np.ndarray, axis: int) -> np.ndarray:
    """Pixels set in each column (axis=0) or row (axis=1) of a boolean mask."""
    # Summing the bytes into int32 (a line is far shorter than 2**31) is about twice as fast as
    # np.count_nonzero along an axis.
    return mask.astype(bool, copy=False).view(np.uint8).sum(axis=axis, dtype=np.int32)


def percentiles(counts: np.ndarray, q: Sequence[float]) -> np.ndarray | None:
    """np.percentile(indices, q) (method 'linear') of the indices where index i occurs counts[i] times.

    float64 values like np.percentile's; None when there is no index at all."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1]) if cumulative.size else 0
    if n == 0:
        return None
    # numpy's steps in Python floats (the same IEEE doubles; a few scalars are cheaper this way):
    # virtual index (n - 1) * q/100, the ranks either side of it (the last rank past the end).
    ranks: list[int] = []
    gammas: list[float] = []
    for percent in q:
        virtual = (n - 1) * (percent / 100)
        below = math.floor(virtual)
        ranks += [n - 1, n - 1] if virtual >= n - 1 else [below, below + 1]
        gammas.append(virtual - below)
    # The k-th smallest index is the first whose cumulative count exceeds k.
    values = np.searchsorted(cumulative, ranks, side="right").tolist()
    result = []
    for gamma, a, b in zip(gammas, values[0::2], values[1::2], strict=True):
        diff = b - a  # numpy's _lerp: from the nearer end, so gamma near 1 gives b exactly
        result.append(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)
    return np.array(result, dtype=np.float64)
