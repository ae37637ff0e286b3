"""The SpecServe paper's controller (AdaSpec, arXiv 2503.05096), as docs/baselines.md fixes it: a gate on one draft
at the running mean confidence c̄, batch-uniform drafting one round at a time while predicted G
rises, confidence-prior pruning down to a smaller padded shape, and the TPOT cap."""

from __future__ import annotations

from gateway.planner.base import Controller, DraftPlan, efficiency, expected_tokens


class EfficiencyGate(Controller):
    def plan(self, p, sessions):
        ok = p.slo_cap_k(sessions) >= 1 and p.gate(sessions, p.running_confidence)
        return {v.key: DraftPlan(1 if ok else 0) for v in sessions}

    def extend(self, p, sessions, drafted, round_):
        """Before round s+1, predict G with each session's next C = C_{i,s} · c̄ and go on only if
        that beats the G it has now; after a round that lowered G, stop. The confidences of rounds
        that did not lower G update c̄."""
        auto = [v for v in sessions if not v.mode and v.key in drafted]
        if not auto or any(len(drafted[v.key].tokens) < round_ for v in auto):
            return {}
        n = len(auto)
        cums = [drafted[v.key].cumulative() for v in auto]
        g_now = expected_tokens(cums) / p.step_ms(auto, [round_] * n)
        g_before = expected_tokens([c[:-1] for c in cums]) / p.step_ms(auto, [round_ - 1] * n)
        if g_now < g_before:
            return {}
        p.observe_confidences([drafted[v.key].confidences[-1] for v in auto])
        if round_ >= min(p.strategy.max_draft_tokens, p.slo_cap_k(auto)):
            return {}
        predicted = [c + [c[-1] * p.running_confidence] for c in cums]
        g_next = expected_tokens(predicted) / p.step_ms(auto, [round_ + 1] * n)
        if g_next < g_now:
            return {}
        return {v.key: DraftPlan(1) for v in auto}

    def prune(self, p, sessions, drafted, keep, auto):
        """If dropping positions shrinks the verify batch to the next smaller padded shape, drop
        them from the session with the lowest final C first, and keep the pruned plan only if its
        predicted G is not lower."""
        cost, n = p.strategy.cost, len(sessions)
        total = sum(keep.values()) + n
        smaller = max((b for b in cost.shape_buckets if b < cost.pad(total)), default=0)
        if smaller < n:  # every session verifies at least one position
            return keep
        pruned, excess = dict(keep), total - smaller
        for k in sorted(auto, key=lambda k: drafted[k].cumulative()[-1]):
            drop = min(excess, pruned[k])
            pruned[k] -= drop
            excess -= drop
            if not excess:
                break
        draft_ms = cost.t_draft(n, max(keep.values()))
        better = efficiency(p, sessions, drafted, pruned, draft_ms) >= efficiency(p, sessions, drafted, keep, draft_ms)
        return pruned if better else keep
