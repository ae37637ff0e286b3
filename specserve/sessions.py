"""The per-session table a model service keeps: lookup, idle eviction, release."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from specserve.config import SESSION_TTL_S

S = TypeVar("S")


class SessionTable(Generic[S]):
    """Sessions by id with their last use; those idle past `ttl_s` are evicted on the next sweep.
    `on_release` is called with each session id that leaves the table (to free its KV)."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, on_release: Callable[[str], None] | None = None):
        self.ttl_s = ttl_s
        self.on_release = on_release
        self._items: dict[str, tuple[S, float]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def values(self) -> list[S]:
        return [s for s, _ in self._items.values()]

    def __contains__(self, session_id: str) -> bool:
        """Whether the session is held (without touching its last use: safe from another thread)."""
        return session_id in self._items

    def get(self, session_id: str) -> S | None:
        entry = self._items.get(session_id)
        if entry is None:
            return None
        self._items[session_id] = (entry[0], time.monotonic())
        return entry[0]

    def put(self, session_id: str, session: S) -> None:
        self._items[session_id] = (session, time.monotonic())

    def owned_by(self, owner: str) -> list[str]:
        """The ids of the sessions named "<owner>/...", the way a gateway names its sessions."""
        return [sid for sid in self._items if sid.startswith(owner + "/")] if owner else []

    def release(self, session_ids: list[str]) -> int:
        released = [sid for sid in session_ids if self._items.pop(sid, None) is not None]
        if self.on_release is not None:
            for sid in released:
                self.on_release(sid)
        return len(released)

    def evict_idle(self) -> int:
        cutoff = time.monotonic() - self.ttl_s
        stale = [sid for sid, (_, used) in self._items.items() if used < cutoff]
        return self.release(stale)
