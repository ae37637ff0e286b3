"""Drafting with a small causal LM, batched over sessions, each with its own budget and early exit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specserve.config import SESSION_TTL_S
from specserve.contracts import Draft, ProposeItem, ProposeOutput, SamplingParams, SessionStatus, Sparse
from specserve.runtime import Row, Runtime
from specserve.sampling import make_generator, processed_probs
from specserve.sessions import SessionTable

DRAFTER_SALT = 2


@dataclass
class DraftSession:
    tokens: list[int]  # every committed token
    cached: list[int]  # the tokens the runtime caches for it (a committed prefix plus drafts)
    generator: torch.Generator
    pending: list[int] = field(default_factory=list)  # drafts of the last call; `cached` ends with all but the last


@dataclass
class _Row:
    item: ProposeItem
    session: DraftSession
    feed: list[int]  # tokens to run before drafting
    draft: Draft
    cumulative: float = 1.0
    done: bool = False
    fed_drafts: list[int] = field(default_factory=list)


def stop_drafting(item: ProposeItem, drafted: int, cumulative: float, latest: float) -> bool:
    """Whether a session stops after `drafted` tokens: budget spent, or confidence too low.
    The token that crossed a threshold is kept: it is already paid for and verifying it is ~free."""
    return (
        drafted >= item.max_draft_tokens
        or cumulative < item.stop_confidence
        or latest < item.min_token_confidence
    )


class DraftModelProposer:
    """Not thread-safe: call from one worker thread."""

    def __init__(self, runtime: Runtime, support_cap: int = 64, session_ttl_s: float = SESSION_TTL_S):
        self.runtime = runtime
        self.max_context = runtime.max_context
        self.support_cap = support_cap  # sampled drafts come from at most this many tokens
        self.device = runtime.device
        self.sessions: SessionTable[DraftSession] = SessionTable(session_ttl_s, runtime.release)

    @property
    def kv_tokens(self) -> int:
        return self.runtime.kv_tokens

    @torch.inference_mode()
    def propose(self, items: list[ProposeItem]) -> ProposeOutput:
        start = time.perf_counter_ns()
        rows, drafts = [], []
        for item in items:
            session = self._sync(item)
            draft = Draft(item.session_id, SessionStatus.OK if session else SessionStatus.NOT_FOUND)
            drafts.append(draft)
            if session is None or (item.extend and not session.pending):
                continue
            if item.extend:
                rows.append(_Row(item, session, session.pending[-1:], draft))
                continue
            n = _common_prefix(session.cached, session.tokens)
            n = min(n, len(session.tokens) - 1)  # always run at least one token
            self.runtime.truncate(item.session_id, n)
            session.cached = session.tokens[:n]
            session.pending = []
            rows.append(_Row(item, session, session.tokens[n:], draft))
        steps = self._draft(rows) if rows else 0
        return ProposeOutput(drafts, steps, time.perf_counter_ns() - start)

    def _sync(self, item: ProposeItem) -> DraftSession | None:
        if item.extend:
            session = self.sessions.get(item.session_id)
            ok = session is not None and len(session.tokens) == item.position and not item.new_tokens
            return session if ok else None
        if item.position == 0:
            self.sessions.release([item.session_id])
            session = DraftSession([], [], make_generator(item.params.seed, DRAFTER_SALT, self.device))
            self.sessions.put(item.session_id, session)
        else:
            session = self.sessions.get(item.session_id)
            if session is None or len(session.tokens) != item.position:
                return None
        session.tokens.extend(item.new_tokens)
        return session if session.tokens else None

    def _draft(self, rows: list[_Row]) -> int:
        live = list(rows)
        feeds = [r.feed for r in rows]
        steps = 0
        while True:
            logits = self.runtime.forward([Row(r.item.session_id, f, [len(f) - 1]) for r, f in zip(live, feeds)])
            steps += 1
            for r, f, row_logits in zip(live, feeds, logits):
                r.session.cached.extend(f)
                room = self.max_context - len(r.session.tokens) - len(r.session.pending) - 1
                if r.item.max_draft_tokens <= len(r.draft.tokens) or room <= len(r.draft.tokens):
                    r.done = True
                    continue
                token, conf, dist = _draw(row_logits, r.item.params, r.session.generator, self.support_cap)
                r.draft.tokens.append(token)
                r.draft.confidences.append(conf)
                if dist is not None:
                    r.draft.distributions.append(dist)
                r.cumulative *= conf
                r.done = stop_drafting(r.item, len(r.draft.tokens), r.cumulative, conf) \
                    or room <= len(r.draft.tokens)
            for r in live:
                if r.done:
                    r.session.pending.extend(r.draft.tokens)
            live = [r for r in live if not r.done]
            if not live:
                return steps
            feeds = [[r.draft.tokens[-1]] for r in live]

    def release(self, session_ids: list[str]) -> int:
        return self.sessions.release(session_ids)


def _draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, cap: int
          ) -> tuple[int, float, Sparse | None]:
    """logits: [1, V] -> (token, its draft probability at temperature 1, the sparse distribution it
    was sampled from, or None when greedy)."""
    raw = torch.softmax(logits[0].float(), dim=-1)
    if params.greedy:
        token = int(raw.argmax())
        return token, float(raw[token]), None
    top_k = min(params.top_k, cap) if params.top_k else cap
    q = processed_probs(logits, SamplingParams(temperature=params.temperature, top_k=top_k, top_p=params.top_p))[0]
    support = q.nonzero().squeeze(1)
    token = int(torch.multinomial(q, 1, generator=generator))
    return token, float(raw[token]), (support.tolist(), q[support].tolist())


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
