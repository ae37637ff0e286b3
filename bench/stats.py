"""Ratios with bootstrap confidence intervals, so a difference inside its interval reads as a tie."""

from __future__ import annotations

import random
import statistics

BOOTSTRAP_SAMPLES = 2000


def ratio_ci(numerator: list[float], denominator: list[float], seed: int = 0) -> dict:
    """mean(numerator) / mean(denominator) over paired samples, with a 95% percentile bootstrap
    interval that resamples the pairs. `verdict` is "win" (interval above 1), "loss" (below 1) or
    "tie"."""
    pairs = list(zip(numerator, denominator))
    if not pairs:
        return {"ratio": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "verdict": "tie"}
    rng = random.Random(seed)
    point = statistics.mean(numerator) / statistics.mean(denominator)
    draws = []
    for _ in range(BOOTSTRAP_SAMPLES):
        sample = [rng.choice(pairs) for _ in pairs]
        draws.append(statistics.mean(a for a, _ in sample) / statistics.mean(b for _, b in sample))
    draws.sort()
    low, high = draws[int(0.025 * len(draws))], draws[int(0.975 * len(draws)) - 1]
    verdict = "win" if low > 1 else "loss" if high < 1 else "tie"
    return {"ratio": point, "low": low, "high": high, "n": len(pairs), "verdict": verdict}
