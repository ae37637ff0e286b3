"""The load ramp: a concurrency schedule that climbs and falls, the per-step series it produces, and
the stall check at the points where speculation switches off or on (pure functions)."""

from __future__ import annotations

import statistics

STALL_FACTOR = 1.5  # a switching step slower than this many times its state's steps is a stall
NEIGHBOURS = 3  # a switching step is compared with the 2 x NEIGHBOURS nearest steps in its state


def triangle(peak: int, hold_s: float) -> list[tuple[float, int]]:
    """(start second, concurrency) from 1 up to `peak` and back to 1, each level held `hold_s`; the
    last pair marks the end."""
    levels = list(range(1, peak + 1)) + list(range(peak - 1, 0, -1))
    return [(i * hold_s, c) for i, c in enumerate(levels)] + [(len(levels) * hold_s, 0)]


def step_series(records: list[tuple[float, dict]]) -> list[dict]:
    """Per step (in order): seconds since the first step, batch size, mean drafts verified per
    session (k), time per forward (a decode burst runs several) and time per output token of the
    step (its time over the tokens each session committed, on average)."""
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
                    "step_ms": float(r["step_ms"]) / max(int(r.get("forwards", 1)), 1),
                    "tpot_ms": float(r["step_ms"]) * batch / committed if committed > 0 else float(r["step_ms"]),
                    "mode": r.get("mode", ""), "prompt": int(r.get("prompt_tokens", 0)) > 0})
    return out


def switch_stalls(series: list[dict]) -> list[dict]:
    """Every decode step where speculation switched off or on (k became 0 or left 0), with its time
    per forward over the median of the 2 x NEIGHBOURS nearest decode steps in the same state (drafting
    or plain) at the same batch size; a switch with no such step has no ratio (None: a forward's time
    grows with the batch, so steps of another batch size are no reference). A switch stalls when
    its step costs more than the state it switched to costs in steady state: the drafter catching up
    on a history it had not read, a first draft round's set-up. (A plain step among speculating ones
    commits fewer tokens per step, and a rejected draft commits one: that is speculation's gain or
    miss, not a stall, and the acceptance figures report it.) `stall` marks a ratio above
    STALL_FACTOR. Steps that read a prompt are left out: they never draft (the prompt's first token
    comes from them) and their time is the prompt's."""
    series = [s for s in series if not s.get("prompt")]
    out = []
    for i in range(1, len(series)):
        drafting = series[i]["k"] > 0
        if drafting == (series[i - 1]["k"] > 0):
            continue
        same = [j for j in range(len(series)) if j != i and (series[j]["k"] > 0) == drafting
                and series[j]["batch"] == series[i]["batch"]]
        nearest = sorted(same, key=lambda j: abs(j - i))[: 2 * NEIGHBOURS]
        reference = statistics.median(series[j]["step_ms"] for j in nearest) if nearest else 0.0
        ratio = series[i]["step_ms"] / reference if reference > 0 else None
        out.append({"t": series[i]["t"], "to": "on" if drafting else "off", "batch": series[i]["batch"],
                    "ratio": ratio, "stall": ratio is not None and ratio > STALL_FACTOR})
    return out


def worst_switch(switches: list[dict]) -> tuple[int, float]:
    """How many switches had a reference at their batch size, and the worst ratio among them."""
    ratios = [s["ratio"] for s in switches if s["ratio"] is not None]
    return len(ratios), max(ratios, default=float("nan"))
