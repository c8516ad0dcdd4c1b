"""Statistics of samples: percentiles, and the summary a benchmark figure keeps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, linearly interpolated (numpy's default)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    low = math.floor(pos)
    high = math.ceil(pos)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarize(values: Sequence[float], *, keep: bool = True) -> dict[str, Any]:
    """n, p50, p95, p99, min, max, mean of ``values`` (and the values themselves)."""
    ordered = sorted(values)
    out: dict[str, Any] = {"n": len(ordered)}
    if ordered:
        out.update(
            p50=round(percentile(ordered, 0.50), 3),
            p95=round(percentile(ordered, 0.95), 3),
            p99=round(percentile(ordered, 0.99), 3),
            min=round(ordered[0], 3),
            max=round(ordered[-1], 3),
            mean=round(sum(ordered) / len(ordered), 3),
        )
    if keep:
        out["samples"] = [round(v, 3) for v in values]
    return out
