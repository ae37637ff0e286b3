"""The hybrid drafter: suffix decoding and the draft model in one service. Per session and call,
the free suffix drafts when they expect enough accepted tokens (or when the planner asked for free
drafts only), the model's otherwise. The model reads a session's tokens only when it drafts for it
(catching up from where it stopped), so a step the suffix serves costs no model forward."""

from __future__ import annotations

import time

from services.drafter.proposers.draft_model import DraftModelProposer
from services.drafter.proposers.suffix import SuffixProposer, expected_accepted
from specserve.contracts import ProposeItem, ProposeOutput, SessionStatus
from specserve.runtime import Runtime
from specserve.sessions import SessionTable

# A suffix draft is taken over the model's once it expects this many accepted tokens (the sum of
# its cumulative probabilities): by then it beats what one model draft round usually gives.
SUFFIX_WINS_AT = 1.5


class HybridProposer:
    """Not thread-safe: call from one worker thread. The suffix proposer holds every session's
    committed tokens; the model holds the prefix it has read."""

    hybrid = True

    def __init__(self, runtime: Runtime, stop_tokens: tuple[int, ...] = (), **kwargs):
        self.suffix = SuffixProposer(stop_tokens=stop_tokens, **kwargs)
        self.model = DraftModelProposer(runtime, **kwargs)
        self.last: dict[str, str] = {}  # per session: which proposer drafted its last round

    @property
    def sessions(self) -> SessionTable:
        return self.suffix.sessions

    @property
    def kv_tokens(self) -> int:
        return self.model.kv_tokens

    def propose(self, items: list[ProposeItem]) -> ProposeOutput:
        start = time.perf_counter_ns()
        drafts = {d.session_id: d for d in self.suffix.propose(items).drafts}
        wanted = []
        for item in items:
            draft = drafts[item.session_id]
            if draft.status is not SessionStatus.OK:
                continue
            by_model = self.last.get(item.session_id) == "model" if item.extend else \
                not item.free_only and expected_accepted(draft.confidences) < SUFFIX_WINS_AT
            self.last[item.session_id] = "model" if by_model else "suffix"
            if by_model:
                wanted.append(self._catch_up(item))
        steps = 0
        if wanted:
            out = self.model.propose(wanted)
            steps = out.draft_steps
            for d in out.drafts:
                # A model that lost the session drafts nothing this time; the suffix's drafts stand.
                if d.status is SessionStatus.OK:
                    drafts[d.session_id] = d
        for sid, draft in drafts.items():
            if draft.status is SessionStatus.OK:
                draft.model_unread = len(self._tokens(sid)) - self._model_position(sid)
        return ProposeOutput([drafts[it.session_id] for it in items], steps, time.perf_counter_ns() - start)

    def _tokens(self, session_id: str) -> list[int]:
        return self.suffix.sessions.get(session_id).index.tokens

    def _model_position(self, session_id: str) -> int:
        """Committed tokens of the session the model holds (0 when it holds another history)."""
        tokens, held = self._tokens(session_id), self.model.sessions.get(session_id)
        return len(held.tokens) if held is not None and held.tokens == tokens[: len(held.tokens)] else 0

    def _catch_up(self, item: ProposeItem) -> ProposeItem:
        """The item for the model: the tokens committed since the model last read this session."""
        if item.extend:
            return item
        tokens, position = self._tokens(item.session_id), self._model_position(item.session_id)
        return ProposeItem(item.session_id, position, tokens[position:], item.model_budget, item.params,
                           item.stop_confidence, item.min_token_confidence)

    def release(self, session_ids: list[str]) -> int:
        for sid in session_ids:
            self.last.pop(sid, None)
        self.model.release(session_ids)
        return self.suffix.release(session_ids)

    def evict_idle(self) -> int:
        self.model.sessions.evict_idle()
        return self.suffix.sessions.evict_idle()
