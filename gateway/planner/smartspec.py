"""SmartSpec (TurboSpec, arXiv 2406.14066): one k per step for the whole batch, by goodput from a
global acceptance rate α."""

from __future__ import annotations

from gateway.planner.base import Controller, DraftPlan

MAX_ALPHA = 0.999  # keeps (1 - α^{k+1}) / (1 - α) finite


class SmartSpec(Controller):
    def plan(self, p, sessions):
        return {v.key: DraftPlan(self.best_k(p, sessions)) for v in sessions}

    @staticmethod
    def best_k(p, sessions) -> int:
        """argmax_k n (1 - α^{k+1}) / (1 - α) / T(k), with goodput(0) boosted by the margin."""
        n, alpha = len(sessions), min(p.strategy.acceptance_rate, MAX_ALPHA)
        best_k, best = 0, 0.0
        for k in range(p.strategy.max_draft_tokens + 1):
            tokens = n * (1 - alpha ** (k + 1)) / (1 - alpha)
            goodput = tokens / p.step_ms(sessions, [k] * n)
            if k == 0:
                goodput *= p.strategy.smartspec_margin
            if goodput > best:
                best_k, best = k, goodput
        return best_k
