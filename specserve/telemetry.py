"""Step telemetry on the Redis stream `specserve:telemetry`.

One record per step, raw counters and timings (never rates). Emission never blocks the step loop:
records go into a bounded buffer that a background task drains with XADD (approximate MAXLEN); when
Redis is down they are dropped and counted, and emission resumes by itself when Redis returns.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
from dataclasses import asdict, is_dataclass
from typing import Any

from specserve.background import Background

log = logging.getLogger(__name__)

STREAM = "specserve:telemetry"
# Records are sent at most this often: a Redis round trip per step cost the model services' event
# loop about a millisecond of every 40 ms decode step, right when the next call arrived.
FLUSH_EVERY_S = 0.1


def encode(record: Any, **extra: Any) -> dict[str, str]:
    """A dataclass or dict as flat stream fields; lists, dicts and booleans become JSON (so a false
    flag reads back false, not the string "False")."""
    doc = asdict(record) if is_dataclass(record) else dict(record)
    doc.update(extra)
    return {k: json.dumps(v) if isinstance(v, (list, dict, tuple, bool)) else str(v) for k, v in doc.items()}


class MalformedRecord(ValueError):
    """A record no consumer should apply (a non-finite number anywhere in it)."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedRecord(f"non-finite number {text}")
    return value


def _no_constant(name: str) -> float:
    raise MalformedRecord(f"non-finite number {name}")


def decode(fields: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    """Stream fields back to values: JSON where it parses, else strings. A non-finite number
    (`1e400`, `Infinity`, `NaN`, also inside a list) raises MalformedRecord."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        key = k.decode() if isinstance(k, bytes) else k
        text = v.decode() if isinstance(v, bytes) else v
        try:
            out[key] = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
        except MalformedRecord:
            raise
        except ValueError:
            out[key] = text
    return out


class TelemetryEmitter(Background):
    """Buffers records and appends them to the stream from a background task."""

    def __init__(self, redis, component: str, instance: str, maxlen: int = 100_000, buffer: int = 10_000,
                 flush_s: float = FLUSH_EVERY_S):
        self.redis, self.component, self.instance, self.maxlen = redis, component, instance, maxlen
        self.flush_s = flush_s
        self.buffer: collections.deque[dict[str, str]] = collections.deque(maxlen=buffer)
        self.sent = 0
        self.dropped = 0
        self.dropping = False  # the last send failed (an outage is under way)
        self._wake = asyncio.Event()

    def emit(self, record: Any) -> None:
        if len(self.buffer) == self.buffer.maxlen:
            self.dropped += 1
        self.buffer.append(encode(record, component=self.component, instance=self.instance))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.flush_s)  # let a batch gather: one round trip per flush, not per step
            self._wake.clear()
            while self.buffer:
                batch = [self.buffer.popleft() for _ in range(min(len(self.buffer), 100))]
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for fields in batch:
                            pipe.xadd(STREAM, fields, maxlen=self.maxlen, approximate=True)
                        await pipe.execute()
                    self.sent += len(batch)
                    self.dropping = False
                except Exception as exc:  # Redis down or refusing: drop, count, carry on
                    # Warn at the first drop of an outage; the count tells the rest.
                    (log.debug if self.dropping else log.warning)("telemetry dropped %d records: %s", len(batch), exc)
                    self.dropped += len(batch)
                    self.dropping = True
                    await asyncio.sleep(0.5)
