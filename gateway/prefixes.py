"""The verifier's prefix cache as the gateway prices it.

The verifier finds the longest cached prefix of a new session's tokens itself (specserve/runtime/
prefix.py); the gateway only needs to know how much of a prompt it will read, to price a step and a
first token: a prompt whose first 240 of 246 tokens are cached costs a decode row, not a prefill.
It looks where the verifier looks, in the running sessions' tokens and in those of recently
finished ones (their KV stays as cache), with the same minimum match. An estimate: where the
verifier holds less than predicted here (it restarted, or evicted), the step takes longer than priced,
and the finished sessions are forgotten, so the next prompts are priced as read in full.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

from specserve.runtime.prefix import MIN_REUSE, common_prefix

# Tokens of finished sessions remembered, most recent first: about what the verifier's default
# prefix cache (1 GiB of host memory) holds for the built-in target.
CAPACITY_TOKENS = 32768


class CachedPrefixes:
    def __init__(self, capacity_tokens: int = CAPACITY_TOKENS):
        self.capacity = capacity_tokens
        self.finished: OrderedDict[str, np.ndarray] = OrderedDict()  # oldest first
        self.tokens = 0

    def finish(self, session_id: str, tokens: list[int]) -> None:
        """A finished session's tokens stay as cache (the oldest leave past the capacity)."""
        if len(tokens) < MIN_REUSE:
            return
        self.finished[session_id] = np.asarray(tokens, dtype=np.int64)
        self.tokens += len(tokens)
        while self.tokens > self.capacity:
            _, dropped = self.finished.popitem(last=False)
            self.tokens -= len(dropped)

    def forget(self) -> None:
        """The verifier no longer holds what was remembered: nothing finished is assumed cached."""
        self.finished.clear()
        self.tokens = 0

    def cached(self, prompt: list[int], running: Iterable[list[int]]) -> int:
        """Prompt tokens the verifier will take from its cache: the longest prefix any running or
        finished session holds, from MIN_REUSE tokens on, less the last (its logits are computed)."""
        limit = len(prompt) - 1
        if limit < MIN_REUSE:
            return 0
        want = np.asarray(prompt[:limit], dtype=np.int64)
        best = 0
        for held in [*(np.asarray(t[:limit], dtype=np.int64) for t in running), *self.finished.values()]:
            if len(held) > best and held[0] == want[0]:
                best = max(best, common_prefix(want, held[:limit]))
        return best if best >= MIN_REUSE else 0
