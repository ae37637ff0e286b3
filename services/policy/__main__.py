"""Run the policy service: python -m services.policy [--algorithm adaptive|specserve|smartspec|threshold|static:K|off]."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

import redis

from services.policy.consumer import Consumer
from services.policy.state import PolicyState, parse_algorithm
from specserve import config as cfg
from specserve import lifeline
from specserve.config import DEFAULT_REDIS_URL, doc
from specserve.errors import InvalidArgument
from specserve.strategy import STRATEGY_KEY, UPDATES_CHANNEL, Strategy

log = logging.getLogger("specserve.policy")
READ_BATCH = 1000  # telemetry entries per read: a quarter second of steps at any load we serve


@dataclass
class PolicyConfig:
    """The policy service."""

    redis_url: str = doc(DEFAULT_REDIS_URL, "Redis holding the telemetry stream and the strategy")
    algorithm: str = doc("adaptive", "adaptive, specserve, smartspec, threshold, static:K or off")
    consumer: str = doc("", "consumer name in the group; empty uses host and pid")
    publish_every_s: float = doc(1.0, "publish at least this often while traffic flows")
    read_every_s: float = doc(0.25, "while traffic flows, read the telemetry this often (records gather in between: "
                                    "a read per step would take CPU from the models)")
    ttl_s: float = doc(10.0, "time-to-live of each published strategy")
    reclaim_idle_ms: int = doc(30_000, "reclaim entries other consumers left pending this long")

    def validate(self) -> None:
        parse_algorithm(self.algorithm)
        if not self.redis_url:
            raise InvalidArgument("redis_url", "the policy needs Redis")
        if not 0 <= self.read_every_s < self.ttl_s / 2:
            raise InvalidArgument("read_every_s", f"must be in [0, ttl_s / 2), got {self.read_every_s}")


def publish(client: redis.Redis, strategy: Strategy) -> bool:
    """Publish the strategy once it validates as every reader will (through its JSON); a fit that
    does not is logged and not published, so readers keep the last valid one."""
    text = strategy.to_json()
    try:
        Strategy.from_json(text)
    except InvalidArgument as exc:
        log.warning("not publishing an invalid fit: %s", exc)
        return False
    client.set(STRATEGY_KEY, text)
    client.publish(UPDATES_CHANNEL, str(strategy.version))
    return True


def last_strategy(client: redis.Redis) -> Strategy | None:
    """The valid strategy in Redis, if any: a restarted (or replacement) policy goes on from it,
    its versions and its cost model, rather than from priors."""
    try:
        raw = client.get(STRATEGY_KEY)
        return Strategy.from_json(raw) if raw else None
    except (redis.RedisError, InvalidArgument):
        return None


def run(config: PolicyConfig, stop=lambda: False) -> None:
    client = redis.Redis.from_url(config.redis_url, socket_timeout=5, socket_connect_timeout=2)
    state = PolicyState(config.algorithm, ttl_s=config.ttl_s)
    state.resume(last_strategy(client))
    name = config.consumer or f"{socket.gethostname()}-{os.getpid()}"
    consumer, last_publish, last_reclaim = None, 0.0, 0.0
    while not stop():
        try:
            if consumer is None:
                consumer = Consumer(client, name, state.observe, min_idle_ms=config.reclaim_idle_ms)
                publish(client, state.decide())
                last_publish = time.monotonic()
                log.info("policy %s consuming as %s", config.algorithm, name)
            now = time.monotonic()
            if now - last_reclaim > config.reclaim_idle_ms / 1000:
                consumer.reclaim()
                last_reclaim = now
            applied = consumer.poll(block_ms=int(config.publish_every_s * 500), count=READ_BATCH)
            # Publish once a second while traffic flows, and before the last one expires regardless.
            if time.monotonic() - last_publish >= (config.publish_every_s if applied else config.ttl_s / 2):
                publish(client, state.decide())
                last_publish = time.monotonic()
            if applied:
                time.sleep(config.read_every_s)
        except redis.RedisError as exc:
            log.warning("redis unavailable (%s); retrying", exc)
            consumer = None
            time.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    cfg.setup_logging()
    lifeline.follow()  # end with the launcher that started this process, if any
    config = cfg.load(PolicyConfig, sys.argv[1:] if argv is None else argv, prog="policy")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    print(f"policy starting with algorithm {config.algorithm}", flush=True)
    run(config, stop=lambda: bool(stopping))


if __name__ == "__main__":
    main()
