"""Live configuration from Redis: the published strategy with the operators' ops keys over it.

Readers load the strategy at start and on every notice (and poll once a second in case a notice
was missed), swap it atomically, and keep the last valid one while Redis is away; once the policy
is away and its strategy expired, the gateway plans on its own (see `LiveConfig.strategy`). Ops
keys (specserve/ops.py) override the strategy and the gateway's defaults; an invalid value is
ignored with a warning and a counter. The longest drafts are the gateway's settings, whatever a
policy publishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from specserve.background import Background
from specserve.errors import InvalidArgument
from specserve.ops import OPS_PREFIX, parse_op
from specserve.strategy import STRATEGY_KEY, UPDATES_CHANNEL, Strategy

log = logging.getLogger(__name__)

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
        # How long a draft may be is the gateway's setting (its configuration, or an ops key), not a policy's.
        base = replace(base, max_draft_tokens=self.default.max_draft_tokens,
                       max_free_draft_tokens=self.default.max_free_draft_tokens)
        overrides = {k: v for k, v in self.ops.items() if k in ("mode", "static_k", "max_draft_tokens", "max_free_draft_tokens")}
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
                # Warn when Redis goes away, not on every retry while it stays away.
                (log.warning if self.live.reachable else log.debug)(
                    "live config unavailable (%s); the last strategy stays in force", exc)
                pubsub = None
                self.live.reachable = False
                self.on_change(self.live)
                await asyncio.sleep(self.poll_s)
