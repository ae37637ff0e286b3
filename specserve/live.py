"""Live configuration from Redis: the published strategy and the operators' `specserve:ops:*` keys.

Readers load the strategy at start and on every notice (and poll once a second in case a notice
was missed), swap it atomically, keep the last valid one while the policy is away, and fall back to
the safe default when it expires. Ops keys override the strategy and the gateway's defaults; each
value is validated, and an invalid one is ignored with a warning and a counter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from specserve.background import Background
from specserve.errors import InvalidArgument
from specserve.strategy import MODES, STRATEGY_KEY, UPDATES_CHANNEL, Strategy

log = logging.getLogger(__name__)

OPS_PREFIX = "specserve:ops:"


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if not lo <= value <= hi:
            raise ValueError(f"must be in [{lo}, {hi}]")
        return value
    return parse


def _ms(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < 3_600_000:
        raise ValueError("must be a number of milliseconds in [0, 3600000)")
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return raw
    return parse


# Each ops key with its parser; a parser raises ValueError on a bad value.
OPS_KEYS: dict[str, Callable[[str], Any]] = {
    "mode": _choice(*MODES),
    "static_k": _int_in(0, 64),
    "max_draft_tokens": _int_in(0, 64),
    "max_batch_size": _int_in(1, 1024),
    "default_ttft_ms": _ms,
    "default_tpot_ms": _ms,
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


@dataclass
class LiveConfig:
    """The latest strategy with ops overrides applied, and counters of what was rejected."""

    default: Strategy
    published: Strategy | None = None
    ops: dict[str, Any] = field(default_factory=dict)
    invalid_ops: int = 0
    invalid_strategies: int = 0
    reachable: bool = True  # Redis answered the last refresh

    def strategy(self) -> Strategy:
        """The published strategy while it is fresh, or while Redis is unreachable (nobody can publish
        a newer one). Once Redis answers and it has expired (the policy is away), the gateway plans
        on its own: `adaptive` over the last published cost model and calibration, which the planner
        keeps correcting from measured steps, so a dead policy never turns speculation on where the
        measurements had turned it off. With nothing ever published: the configured default."""
        if self.published is None:
            base = self.default
        elif not self.reachable or not self.published.expired():
            base = self.published
        else:
            base = replace(self.published, mode="adaptive", policy=f"gateway-fallback (last: {self.published.policy})")
        overrides = {k: v for k, v in self.ops.items() if k in ("mode", "static_k", "max_draft_tokens")}
        return base.with_overrides(**overrides) if overrides else base


class LiveReader(Background):
    """Follows the strategy key, its notices and the ops keys; `on_change` gets the LiveConfig."""

    def __init__(self, redis, live: LiveConfig, on_change: Callable[[LiveConfig], None], poll_s: float = 1.0):
        self.redis, self.live, self.on_change, self.poll_s = redis, live, on_change, poll_s
        self._bad_seen: set[tuple[str, str]] = set()

    async def refresh(self) -> None:
        raw = await self.redis.get(STRATEGY_KEY)
        self.live.reachable = True
        if raw is not None:
            try:
                strategy = Strategy.from_json(raw)
                if self.live.published is None or strategy.version != self.live.published.version \
                        or strategy.issued_at != self.live.published.issued_at:
                    self.live.published = strategy
            except InvalidArgument as exc:
                self.live.invalid_strategies += 1
                log.warning("ignoring invalid strategy: %s", exc)
        ops = {}
        keys = [k async for k in self.redis.scan_iter(match=OPS_PREFIX + "*")]
        values = await self.redis.mget(keys) if keys else []
        for key, value in zip(keys, values):
            name = (key.decode() if isinstance(key, bytes) else key)[len(OPS_PREFIX):]
            text = value.decode() if isinstance(value, bytes) else str(value)
            try:
                ops[name] = parse_op(name, text)
            except InvalidArgument as exc:
                if (name, text) not in self._bad_seen:  # count and warn once per bad value
                    self._bad_seen.add((name, text))
                    self.live.invalid_ops += 1
                    log.warning("ignoring ops key: %s", exc)
        self.live.ops = ops
        self.on_change(self.live)

    async def refresh_safely(self) -> None:
        """One refresh at start; a Redis that is down leaves the defaults in force."""
        try:
            await self.refresh()
        except Exception as exc:
            log.warning("live config unavailable at start (%s); using defaults", exc)

    async def _run(self) -> None:
        pubsub = None
        while True:
            try:
                if pubsub is None:
                    pubsub = self.redis.pubsub()
                    await pubsub.subscribe(UPDATES_CHANNEL)
                await self.refresh()
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.poll_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: keep the last strategy, retry
                log.debug("live config unavailable: %s", exc)
                pubsub = None
                self.live.reachable = False
                self.on_change(self.live)
                await asyncio.sleep(self.poll_s)
