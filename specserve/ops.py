"""The operators' live keys, `specserve:ops:*`: which there are and how each value is validated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from specserve.contracts import MAX_PLAIN_STEPS
from specserve.errors import InvalidArgument
from specserve.strategy import MAX_DRAFT_TOKENS_LIMIT, MODES

OPS_PREFIX = "specserve:ops:"


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if not lo <= value <= hi:
            raise ValueError(f"must be in [{lo}, {hi}]")
        return value
    return parse


def _ms_below(hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        if not 0 <= value < hi:
            raise ValueError(f"must be a number of milliseconds in [0, {hi:.0f})")
        return value
    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return raw
    return parse


# Each ops key with its parser; a parser raises ValueError on a bad value.
OPS_KEYS: dict[str, Callable[[str], Any]] = {
    "mode": _choice(*MODES),
    "static_k": _int_in(0, MAX_DRAFT_TOKENS_LIMIT),
    "max_draft_tokens": _int_in(0, MAX_DRAFT_TOKENS_LIMIT),
    "max_free_draft_tokens": _int_in(0, MAX_DRAFT_TOKENS_LIMIT),
    "max_batch_size": _int_in(1, 1024),
    "max_plain_steps": _int_in(1, MAX_PLAIN_STEPS),
    "linger_ms": _ms_below(1000),
    "default_ttft_ms": _ms_below(3_600_000),
    "default_tpot_ms": _ms_below(3_600_000),
    "admission": _choice("reject", "best_effort", "off"),
}


def parse_op(name: str, raw: str) -> Any:
    """The validated value of one ops key; InvalidArgument naming the key otherwise."""
    if name not in OPS_KEYS:
        raise InvalidArgument(name, f"unknown ops key; known: {', '.join(OPS_KEYS)}")
    try:
        return OPS_KEYS[name](raw.strip())
    except ValueError as exc:
        raise InvalidArgument(name, f"{raw!r} {exc}") from None
