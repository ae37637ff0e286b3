"""This project's controller (docs/design.md section 4): calibrated survival probabilities, per-session
early exit, a slot budget that fills up to the padded shape, the cost model corrected online, and
per-request SLO slack."""

from __future__ import annotations

from gateway.planner.base import Controller, DraftPlan, corrected

LATE_BAR_FACTOR = 0.5  # a session behind its TPOT schedule drafts on at half the bar: it needs tokens
# The slot budget keeps drafts only where they beat plain decoding by this factor: the slots a step
# keeps are those whose survival looks best, so a predicted gain of a few percent is often none.
PRUNE_MARGIN = 1.05


class Adaptive(Controller):
    def plan(self, p, sessions):
        """Per-session early exit on the calibrated survival probability.

        A further draft position j+1 is worth its cost when its expected gain Ĉ_j · c̄ exceeds
        G · ΔT, the tokens the same time would give at the plan's efficiency. ΔT is one more draft
        row plus one more verified position, the draft pass's fixed cost shared by the batch. A
        session behind its TPOT schedule gets a lower bar (it needs tokens more than the batch
        needs throughput); the tightest TPOT SLO caps every budget.
        """
        cost, n = p.strategy.cost, len(sessions)
        if p.prompt_tokens:
            # A prompt's first token comes from this step: no draft makes it wait.
            return {v.key: DraftPlan() for v in sessions}
        c_bar = p.strategy.mean_confidence  # observed per-token survival (accepted / drafted), from the policy
        k_cap = p.slo_cap_k(sessions)
        # Drafts that cost no model (a free drafter's, a hybrid's suffix lookup): ask for the whole
        # budget and let `prune` keep the slots whose survival pays for their verify positions,
        # from each draft's own confidence.
        free_cap = p.slo_cap_k(sessions, free=True) if cost.draft_free or p.hybrid else 0
        if cost.draft_free:
            return {v.key: DraftPlan(free_cap) for v in sessions}
        if k_cap == 0:
            return {v.key: DraftPlan(free_cap, free_only=True) for v in sessions}
        # The drafter's reading of unread tokens (prompts it has not seen) stays within a plain
        # decode step's time per step: sessions cheapest to catch up first; the rest draft no
        # model tokens this step, or the reading would stall the step and every first token
        # behind it.
        budget_ms, stalling = p.step_ms(sessions, [0] * n), set()
        reading = {v.key: p.catchup_ms([v]) for v in sessions}
        for key in sorted(reading, key=reading.get):
            budget_ms -= reading[key]
            if budget_ms < 0:
                stalling.add(key)
        plans = {key: DraftPlan(free_cap, free_only=True) for key in stalling}
        sessions = [v for v in sessions if v.key not in stalling]
        if not sessions:
            return plans
        return plans | self._plan(p, sessions, k_cap, free_cap, c_bar)

    def _plan(self, p, sessions, k_cap, free_cap, c_bar):
        cal, cost, n = p.strategy.calibration, p.strategy.cost, len(sessions)
        if not p.gate(sessions, c_bar):
            # Closed by the estimates: probe one model draft per session now and then, within the
            # budget (the drafter's catch-up included); a hybrid drafter's free drafts are asked
            # for otherwise (prune weighs them).
            extra_ms = p.step_ms(sessions, [1] * n) - p.step_ms(sessions, [0] * n) + p.catchup_ms(sessions)
            p.exploring = p.may_explore(extra_ms)
            if p.exploring:
                return {v.key: DraftPlan(1) for v in sessions}
            return {v.key: DraftPlan(free_cap, free_only=True) for v in sessions}
        efficiency_k1 = (n + n * c_bar) / p.step_ms(sessions, [1] * n)  # tokens per ms at k = 1
        # One more draft row and one more verified position, both in measured (scaled) time, as
        # the efficiency is: the slower the measured steps, the higher the bar.
        ctx = sum(v.context for v in sessions)
        verify_ms = cost.t_verify(2 * n + 1, ctx) - cost.t_verify(2 * n, ctx)
        marginal_ms = (cost.draft_per_seq + cost.draft_fixed / n + max(verify_ms, 0.0)) * p.time_scale * p.draft_scale
        bar = efficiency_k1 * marginal_ms / max(c_bar, 1e-6)
        return {v.key: DraftPlan(max(k_cap, free_cap), max_model_draft_tokens=k_cap,
                                 stop_confidence=cal.inverse(min(bar * (LATE_BAR_FACTOR if v.behind_ms > 0 else 1.0), 1.0)))
                for v in sessions}

    def prune(self, p, sessions, drafted, keep, auto):
        """The slot budget: drop slots least likely first (by calibrated Ĉ), and keep the plan of
        highest predicted G among all the numbers of slots dropped; a cost that steps at a shape
        edge pays only once the whole excess is gone, so one slot at a time would stop short of it.
        Ĉ, corrected by the session's hazard ratio, falls along each session's drafts, so the
        slots kept are the most likely ones of the step and each session's are a prefix of its
        drafts. A plan that beats plain decoding by less than PRUNE_MARGIN keeps no slot."""
        # The drafting is done; a hybrid's free drafts cost nothing, and its model's are priced low
        # here (the slot budget then errs towards dropping slots).
        draft_ms = 0.0 if p.hybrid else p.strategy.cost.t_draft(len(sessions), max(keep.values()))
        cost, ctx = p.strategy.cost, sum(v.context for v in sessions)
        hazard = {v.key: v.hazard for v in sessions}
        survival = {k: corrected(p.survival(drafted[k])[: keep[k]], hazard.get(k, 1.0)) for k in keep}
        fixed = [k for k in keep if k not in auto]
        tokens = len(keep) + sum(sum(survival[k]) for k in fixed)
        fixed_drafts = sum(keep[k] for k in fixed)
        positions = len(sessions) + p.prompt_tokens + fixed_drafts
        slots = sorted(((c, j, k) for k in auto for j, c in enumerate(survival[k])), key=lambda s: (-s[0], s[1]))
        gains = [tokens]
        for c, _, _ in slots:
            gains.append(gains[-1] + c)

        def efficiency(m: int) -> float:
            return gains[m] / ((draft_ms + cost.t_verify(positions + m, ctx, prompt=p.prompt_tokens > 0))
                               * p.scale_for(m + fixed_drafts))

        best = max(range(len(slots), -1, -1), key=efficiency)  # ties: the most slots
        if best and efficiency(best) < PRUNE_MARGIN * efficiency(0):
            best = 0  # within the margin of plain decoding: no gain to count on
        plan = {k: keep[k] for k in fixed} | {k: 0 for k in auto}
        for _, _, k in slots[:best]:
            plan[k] += 1
        return plan
