"""Trace replay: read a request trace, cut a window, scale its arrival times (pure functions)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class TraceRow:
    t: float  # seconds since the trace's first request
    context: int
    generated: int


def read_trace(path: Path) -> list[TraceRow]:
    """Columns TIMESTAMP, ContextTokens, GeneratedTokens; rows sorted by time."""
    rows = []
    with Path(path).open(newline="") as f:
        for rec in csv.DictReader(f):
            stamp = rec["TIMESTAMP"].strip()
            # Seven fractional digits do not parse with %f; keep microseconds.
            head, _, frac = stamp.partition(".")
            when = datetime.strptime(f"{head}.{(frac + '000000')[:6]}", "%Y-%m-%d %H:%M:%S.%f")
            rows.append((when.timestamp(), int(rec["ContextTokens"]), int(rec["GeneratedTokens"])))
    rows.sort()
    t0 = rows[0][0] if rows else 0.0
    return [TraceRow(t - t0, c, g) for t, c, g in rows]


def window(rows: list[TraceRow], start: int, count: int) -> list[TraceRow]:
    """`count` consecutive requests from row `start`, re-timed to start at 0."""
    cut = rows[start : start + count]
    t0 = cut[0].t if cut else 0.0
    return [TraceRow(r.t - t0, r.context, r.generated) for r in cut]


def arrivals(rows: list[TraceRow], rate: float) -> list[float]:
    """The rows' send times (seconds from the first): the window's arrival pattern, time-scaled so
    it averages `rate` requests per second (as recorded where `rate` is infinite or zero)."""
    span = rows[-1].t - rows[0].t if rows else 0.0
    stretch = (len(rows) - 1) / span / rate if span > 0 and 0 < rate < float("inf") else 1.0
    return [(r.t - rows[0].t) * stretch for r in rows]


def fit_prompt(tokens: list[int], length: int) -> list[int]:
    """Cut the prompt to `length` tokens, or repeat it until it is that long."""
    if not tokens:
        raise ValueError("empty prompt")
    out = list(tokens)
    while len(out) < length:
        out += tokens
    return out[:length]
