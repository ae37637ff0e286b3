"""Ratios with bootstrap confidence intervals, so a difference inside its interval reads as a tie."""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence

BOOTSTRAP_SAMPLES = 2000


def ratio_ci(numerator: list[float], denominator: list[float], seed: int = 0,
             stat: Callable[[Sequence[float]], float] = statistics.mean, lower_is_better: bool = False) -> dict:
    """stat(numerator) / stat(denominator) over paired samples (the mean unless told, e.g. a
    percentile), with a 95% percentile bootstrap interval that resamples the pairs. `verdict` is
    "win" (interval above 1; below 1 for a time, `lower_is_better`), "loss" (the other side) or
    "tie"."""
    pairs = list(zip(numerator, denominator))
    if not pairs:
        return {"ratio": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "verdict": "tie"}
    rng = random.Random(seed)
    point = _ratio(pairs, stat)
    draws = []
    for _ in range(BOOTSTRAP_SAMPLES):
        draws.append(_ratio([rng.choice(pairs) for _ in pairs], stat))
    draws.sort()
    low, high = draws[int(0.025 * len(draws))], draws[int(0.975 * len(draws)) - 1]
    above, below = ("loss", "win") if lower_is_better else ("win", "loss")
    verdict = above if low > 1 else below if high < 1 else "tie"
    return {"ratio": point, "low": low, "high": high, "n": len(pairs), "verdict": verdict}


def _ratio(pairs: list[tuple[float, float]], stat: Callable[[Sequence[float]], float]) -> float:
    """stat(a) / stat(b); a zero denominator gives inf, and two zeros are equal (1)."""
    a, b = stat([x for x, _ in pairs]), stat([y for _, y in pairs])
    return a / b if b else (float("inf") if a else 1.0)
