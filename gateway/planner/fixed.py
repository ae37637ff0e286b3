"""The controllers without a cost model: `static:K` (vLLM's fixed `num_speculative_tokens`) and
`threshold` (DISCO / Hugging Face `assistant_confidence_threshold`: stop a session's drafting when
its latest token's draft probability falls below the threshold)."""

from __future__ import annotations

from gateway.planner.base import Controller, DraftPlan


class Static(Controller):
    def plan(self, p, sessions):
        return {v.key: DraftPlan(p.strategy.static_k) for v in sessions}


class Threshold(Controller):
    def plan(self, p, sessions):
        s = p.strategy
        return {v.key: DraftPlan(s.max_draft_tokens, min_token_confidence=s.threshold) for v in sessions}
