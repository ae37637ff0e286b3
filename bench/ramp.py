"""The load ramp: a concurrency schedule that climbs and falls, the per-step series it produces, and
the stall check at the points where speculation switches off or on (pure functions)."""

from __future__ import annotations

import statistics

STALL_FACTOR = 1.5  # a step slower than this many times its neighbours is a stall
NEIGHBOURS = 3  # steps on each side a switching step is compared with


def triangle(peak: int, hold_s: float) -> list[tuple[float, int]]:
    """(start second, concurrency) from 1 up to `peak` and back to 1, each level held `hold_s`; the
    last pair marks the end."""
    levels = list(range(1, peak + 1)) + list(range(peak - 1, 0, -1))
    return [(i * hold_s, c) for i, c in enumerate(levels)] + [(len(levels) * hold_s, 0)]


def step_series(records: list[tuple[float, dict]]) -> list[dict]:
    """Per step (in order): seconds since the first step, batch size, mean drafts verified per
    session (k), and time per output token of the step (its time over the tokens each session
    committed, on average)."""
    if not records:
        return []
    t0 = records[0][0]
    out = []
    for t, r in records:
        batch = int(r["batch_size"])
        drafted = sum(int(d) for d in r["drafted"])
        # Each verified position that is neither a draft nor a prompt token commits a token: one
        # per session in a step, one per session and forward in a decode burst.
        plain = int(r["verified_positions"]) - drafted - int(r.get("prompt_tokens", 0))
        committed = sum(int(a) for a in r["accepted"]) + plain
        out.append({"t": t - t0, "batch": batch, "k": drafted / batch if batch else 0.0,
                    "tpot_ms": float(r["step_ms"]) * batch / committed if committed > 0 else float(r["step_ms"]),
                    "mode": r.get("mode", ""), "prompt": int(r.get("prompt_tokens", 0)) > 0})
    return out


def switch_stalls(series: list[dict]) -> list[dict]:
    """Every decode step where speculation switched off or on (k became 0 or left 0), with its
    per-token time over the median of up to NEIGHBOURS decode steps on each side at the same batch
    size or, where there are none, any batch size. `stall` marks a ratio above STALL_FACTOR. Steps
    that read a prompt are left out: they never draft (the prompt's first token comes from them)
    and their time is the prompt's, so they would read as switches and as stalls."""
    series = [s for s in series if not s.get("prompt")]
    out = []
    for i in range(1, len(series)):
        if (series[i]["k"] > 0) == (series[i - 1]["k"] > 0):
            continue
        around = series[max(0, i - NEIGHBOURS) : i] + series[i + 1 : i + 1 + NEIGHBOURS]
        same = [s for s in around if s["batch"] == series[i]["batch"]] or around
        reference = statistics.median(s["tpot_ms"] for s in same)
        ratio = series[i]["tpot_ms"] / reference if reference > 0 else float("nan")
        out.append({"t": series[i]["t"], "to": "on" if series[i]["k"] > 0 else "off", "batch": series[i]["batch"],
                    "ratio": ratio, "stall": ratio > STALL_FACTOR})
    return out
