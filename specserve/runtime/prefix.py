"""Automatic prefix caching, shared by both runtimes: which tokens each KV sequence holds, the live
sessions' and the retired ones' (a released session's KV stays as cache until its room is needed,
least recently used first), and the longest cached prefix of a new session's tokens.

A new session whose tokens begin with tokens some sequence holds takes that prefix's KV (llama.cpp
shares the cells, torch copies them) and computes only the rest. Reuse is lossless: the same tokens
at the same positions have the same keys and values.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np

from specserve.runtime.base import Row

# A shorter match is not worth a fork: computing a few tokens costs about what finding and sharing
# them does.
MIN_REUSE = 4


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two 1-D integer arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixIndex:
    """Tokens per KV sequence key. Live keys are session ids; a released session's key is renamed
    to a cache key of its own (`retire`), so a new session may reuse the id at once."""

    def __init__(self):
        self.live: dict[str, list[int]] = {}
        self.retired: OrderedDict[str, list[int]] = OrderedDict()  # oldest first
        self._names = itertools.count()

    def tokens(self, key: str) -> list[int]:
        return self.live.setdefault(key, [])

    def truncate(self, key: str, length: int) -> None:
        if key in self.live:
            del self.live[key][length:]

    def retire(self, key: str) -> str | None:
        """Keep a released session's tokens as cache; returns its cache key (None when it held none)."""
        tokens = self.live.pop(key, None)
        if not tokens:
            return None
        name = f"\0cache-{next(self._names)}"
        self.retired[name] = tokens
        return name

    def oldest_retired(self) -> str | None:
        return next(iter(self.retired), None)

    def drop(self, key: str) -> None:
        self.retired.pop(key, None)
        self.live.pop(key, None)

    @property
    def retired_tokens(self) -> int:
        return sum(len(t) for t in self.retired.values())

    def longest(self, key: str, tokens: list[int], limit: int) -> tuple[str | None, int]:
        """For the sequence `key` about to append `tokens` (its kept logits starting at index
        `limit`): the other key holding the longest prefix of its held tokens plus these, past the
        held ones by MIN_REUSE or more and by at most `limit`, and that prefix's length. A retired
        hit becomes the most recently used."""
        held = self.live.get(key, [])
        if limit < MIN_REUSE or not (held or tokens):
            return None, 0
        want = np.asarray(held + tokens[:limit], dtype=np.int64)
        best, best_n = None, len(held) + MIN_REUSE - 1
        for other, seq in itertools.chain(self.live.items(), self.retired.items()):
            if other != key and len(seq) > best_n and seq[0] == want[0]:
                n = common_prefix(want, np.asarray(seq[: len(want)], dtype=np.int64))
                if n > best_n:
                    best, best_n = other, n
        if best is None:
            return None, 0
        if best in self.retired:
            self.retired.move_to_end(best)
        return best, best_n


def skip(row: Row, n: int, index: PrefixIndex) -> Row:
    """The row less its first n tokens, whose KV the session now holds from the cache."""
    index.tokens(row.session_id).extend(row.tokens[:n])
    row.reused = n
    return Row(row.session_id, row.tokens[n:], [i - n for i in row.keep], row.argmax)
