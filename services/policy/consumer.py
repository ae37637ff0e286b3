"""The telemetry consumer: a Redis consumer group over `specserve:telemetry`.

Entries are acknowledged one by one right after they are applied, so a consumer that dies leaves
at most the entries it had not applied pending; another consumer reclaims those (XAUTOCLAIM) and
applies them. A malformed entry is logged, counted and acknowledged, never fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from specserve.telemetry import STREAM, decode

log = logging.getLogger(__name__)

GROUP = "specserve-policy"


def ensure_group(client: redis.Redis, stream: str = STREAM, group: str = GROUP) -> None:
    """Create the group (and the stream) once; an existing group is fine."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class Consumer:
    def __init__(self, client: redis.Redis, name: str, apply: Callable[[dict], None],
                 stream: str = STREAM, group: str = GROUP, min_idle_ms: int = 30_000):
        self.client, self.name, self.apply = client, name, apply
        self.stream, self.group, self.min_idle_ms = stream, group, min_idle_ms
        self.malformed = 0
        ensure_group(client, stream, group)

    def reclaim(self, count: int = 100) -> int:
        """Take over entries another consumer left pending for min_idle_ms, and apply them."""
        _, entries, _ = self.client.xautoclaim(self.stream, self.group, self.name, self.min_idle_ms, "0-0", count=count)
        return self._handle(entries)

    def poll(self, block_ms: int = 500, count: int = 200) -> int:
        """Read new entries (and this consumer's own pending ones first) and apply them."""
        for start in ("0", ">"):
            reply = self.client.xreadgroup(self.group, self.name, {self.stream: start}, count=count,
                                           block=None if start == "0" else block_ms)
            handled = sum(self._handle(entries) for _, entries in reply or [])
            if handled:
                return handled
        return 0

    def _handle(self, entries) -> int:
        """Apply the entries, then acknowledge them all in one round trip (an entry applied but not
        acknowledged when this consumer dies is applied again by whoever reclaims it)."""
        done, ids = 0, []
        for entry_id, fields in entries:
            ids.append(entry_id)
            if fields is None:  # trimmed away by MAXLEN before we got to it
                continue
            try:
                self.apply(decode(fields))
            except (KeyError, TypeError, ValueError, OverflowError) as exc:  # one bad record never kills the loop
                self.malformed += 1
                log.warning("skipping malformed telemetry entry %s: %s", entry_id, exc)
            done += 1
        if ids:
            self.client.xack(self.stream, self.group, *ids)
        return done
