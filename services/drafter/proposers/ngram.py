"""Prompt-lookup drafting: continue the sequence the way it continued after the same n-gram before."""

from __future__ import annotations

import time

from specserve.config import SESSION_TTL_S
from specserve.contracts import Draft, ProposeItem, ProposeOutput, SessionStatus
from specserve.sessions import SessionTable


def ngram_lookup(tokens: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram
    (n from max_n down to min_n); [] when no suffix n-gram occurred before."""
    if k <= 0:
        return []
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[-n:]
        # Search right to left, skipping the suffix itself, so recent context wins.
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                follow = tokens[start + n : start + n + k]
                if follow:
                    return follow
    return []


class NgramProposer:
    """No model: drafts come from the session's own tokens, each with a fixed confidence."""

    free = True  # costs what it measures, not a forward per token

    def __init__(self, max_n: int = 3, min_n: int = 1, confidence: float = 0.5, session_ttl_s: float = SESSION_TTL_S):
        self.max_n, self.min_n, self.confidence = max_n, min_n, confidence
        # Per session: its committed tokens and the drafts of the last call, in one value so that
        # idle eviction frees both.
        self.sessions: SessionTable[tuple[list[int], list[int]]] = SessionTable(session_ttl_s)

    def propose(self, items: list[ProposeItem]) -> ProposeOutput:
        start = time.perf_counter_ns()
        drafts = []
        for item in items:
            held = ([], []) if item.position == 0 and not item.extend else self.sessions.get(item.session_id)
            if held is None or len(held[0]) != item.position or (item.extend and item.new_tokens):
                drafts.append(Draft(item.session_id, SessionStatus.NOT_FOUND))
                continue
            tokens = held[0] + item.new_tokens
            pending = held[1] if item.extend else []
            out = ngram_lookup(tokens + pending, item.max_draft_tokens, self.max_n, self.min_n)
            self.sessions.put(item.session_id, (tokens, pending + out))
            # A deterministic proposer samples from a point mass on its token.
            dists = [] if item.params.greedy else [([t], [1.0]) for t in out]
            drafts.append(Draft(item.session_id, SessionStatus.OK, out, [self.confidence] * len(out), dists, free=True))
        return ProposeOutput(drafts, 0, time.perf_counter_ns() - start)

    def release(self, session_ids: list[str]) -> int:
        return self.sessions.release(session_ids)
