"""Per-step speculation planning: how far each session drafts this step, and what gets verified.

Every controller reads the strategy's parameters and the step's live draft confidences. Notation
(DESIGN.md section 4): n sessions, C_{i,j} the cumulative draft confidence of session i after j
drafts, T_draft(n, k) and T_verify(N, ctx) the cost model, G = E[tokens] / T_step.

A step runs in rounds: `plan` gives each session a budget; after drafting, `extend` may ask for
more (the batch-uniform `specserve` controller drafts one round per position); `prune` then chooses
how many of each session's drafts to verify.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specserve.strategy import Strategy

INITIAL_MEAN_CONFIDENCE = 0.6  # specserve's c̄ before any draft is seen (the paper's initial value)
# The step-time correction: an exponential mean of measured / predicted time. Weight 0.3 follows a
# change within a few steps; the clamp keeps one outlier (a GC pause, a cold cache) from swinging it.
TIME_SCALE_WEIGHT = 0.3
MIN_TIME_SCALE, MAX_TIME_SCALE = 0.01, 100.0


@dataclass
class SessionView:
    """What the planner sees of one running session."""

    key: str
    context: int  # committed tokens
    tpot_slo_ms: float = 0.0  # 0: none
    behind_ms: float = 0.0  # how far the session is behind its TPOT schedule (> 0 is late)
    mode: str = ""  # a per-request override of the strategy's mode ("off", "static")
    static_k: int = 0


@dataclass
class DraftPlan:
    max_draft_tokens: int = 0
    stop_confidence: float = 0.0  # on the raw cumulative confidence
    min_token_confidence: float = 0.0


@dataclass
class Drafted:
    """A session's drafts so far this step."""

    tokens: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)

    def cumulative(self) -> list[float]:
        out, c = [], 1.0
        for p in self.confidences:
            c *= p
            out.append(c)
        return out


def expected_tokens(cumulative: list[list[float]]) -> float:
    """E[tokens] = n + sum_i sum_j C_{i,j}."""
    return len(cumulative) + sum(sum(c) for c in cumulative)


class Planner:
    """Holds the running state a controller keeps between steps (the specserve running mean c̄)."""

    def __init__(self, strategy: Strategy):
        self.strategy = strategy
        self.reasons: dict[str, str] = {}  # why a session got no drafts in the last plan
        # specserve's c̄: the running mean of the draft confidences of every draft round that did not
        # lower G, over all steps; its prior counts as one observation.
        self._confidence_sum, self._confidence_n = INITIAL_MEAN_CONFIDENCE, 1
        self.time_scale = 1.0  # measured / predicted step time, tracked online

    def observe_step(self, predicted_ms: float, measured_ms: float) -> None:
        """Correct the cost model online: an exponential mean of measured over predicted step time
        (the policy refits the coefficients; this keeps predictions honest between publications)."""
        if predicted_ms > 0 and measured_ms > 0:
            ratio = min(max(measured_ms / (predicted_ms / self.time_scale), MIN_TIME_SCALE), MAX_TIME_SCALE)
            self.time_scale = (1 - TIME_SCALE_WEIGHT) * self.time_scale + TIME_SCALE_WEIGHT * ratio

    @property
    def running_confidence(self) -> float:
        return self._confidence_sum / self._confidence_n

    def set_strategy(self, strategy: Strategy) -> None:
        self.strategy = strategy

    # --- the cost side -------------------------------------------------------------------------
    def step_ms(self, sessions: list[SessionView], ks: list[int]) -> float:
        cost = self.strategy.cost
        ctx = sum(s.context for s in sessions)
        drafting = max(ks, default=0)
        return (cost.t_draft(len(sessions), drafting) + cost.t_verify(sum(k + 1 for k in ks), ctx)) * self.time_scale

    def slo_cap_k(self, sessions: list[SessionView]) -> int:
        """The largest uniform k whose predicted step time fits the tightest TPOT SLO (0 always fits)."""
        caps = [s.tpot_slo_ms for s in sessions if s.tpot_slo_ms > 0]
        kmax = self.strategy.max_draft_tokens
        if not caps:
            return kmax
        cap = min(caps)
        k = kmax
        while k > 0 and self.step_ms(sessions, [k] * len(sessions)) > cap:
            k -= 1
        return k

    def gate(self, sessions: list[SessionView], confidence: float) -> bool:
        """Speculate only if one draft per session at this confidence beats plain decoding."""
        n = len(sessions)
        plain = n / self.step_ms(sessions, [0] * n)
        one = (n + n * confidence) / self.step_ms(sessions, [1] * n)
        return one > plain * self.strategy.gate_margin

    # --- the controllers ---------------------------------------------------------------------
    def plan(self, sessions: list[SessionView]) -> dict[str, DraftPlan]:
        plans = self._plan(sessions)
        mode = self.strategy.mode
        self.reasons = {}
        for v in sessions:
            if plans[v.key].max_draft_tokens > 0:
                continue
            if v.mode:
                self.reasons[v.key] = "speculation off for this request" if v.mode == "off" else "static k = 0 requested"
            elif mode == "off" or self.strategy.max_draft_tokens == 0:
                self.reasons[v.key] = f"mode {mode}" + (" (max_draft_tokens 0)" if mode != "off" else "")
            elif mode in ("adaptive", "specserve", "smartspec"):
                self.reasons[v.key] = (f"{mode}: the TPOT SLO leaves no time to draft" if self.slo_cap_k(sessions) == 0
                                       else f"{mode}: the cost model predicts plain decoding is faster here")
            else:
                self.reasons[v.key] = f"{mode}: no draft this step"
        return plans

    def _plan(self, sessions: list[SessionView]) -> dict[str, DraftPlan]:
        s = self.strategy
        plans = {v.key: DraftPlan() for v in sessions}
        auto = [v for v in sessions if not v.mode]
        for v in sessions:
            if v.mode == "static":
                plans[v.key] = DraftPlan(v.static_k)
        if not auto or s.mode == "off" or s.max_draft_tokens == 0:
            return plans
        if s.mode == "static":
            return plans | {v.key: DraftPlan(s.static_k) for v in auto}
        if s.mode == "threshold":
            return plans | {v.key: DraftPlan(s.max_draft_tokens, min_token_confidence=s.threshold) for v in auto}
        if s.mode == "smartspec":
            return plans | {v.key: DraftPlan(self._smartspec_k(auto)) for v in auto}
        if s.mode == "specserve":
            ok = self.slo_cap_k(auto) >= 1 and self.gate(auto, self.running_confidence)
            return plans | {v.key: DraftPlan(1 if ok else 0) for v in auto}
        return plans | self._adaptive(auto)

    def _smartspec_k(self, sessions: list[SessionView]) -> int:
        """argmax_k n (1 - α^{k+1}) / (1 - α) / T(k), with goodput(0) boosted by the margin."""
        n, alpha = len(sessions), min(self.strategy.acceptance_rate, 0.999)
        best_k, best = 0, 0.0
        for k in range(self.strategy.max_draft_tokens + 1):
            tokens = n * (1 - alpha ** (k + 1)) / (1 - alpha)
            goodput = tokens / self.step_ms(sessions, [k] * n)
            if k == 0:
                goodput *= self.strategy.smartspec_margin
            if goodput > best:
                best_k, best = k, goodput
        return best_k

    def _adaptive(self, sessions: list[SessionView]) -> dict[str, DraftPlan]:
        """Per-session early exit on the calibrated survival probability.

        A further draft position j+1 is worth its cost when its expected gain Ĉ_j · c̄ exceeds
        G · ΔT, the tokens the same time would give at the plan's efficiency. ΔT is one more draft
        row plus one more verified position, the draft pass's fixed cost shared by the batch. A
        session behind its TPOT schedule gets a lower bar (it needs tokens more than the batch
        needs throughput); the tightest TPOT SLO caps every budget.
        """
        cal, cost = self.strategy.calibration, self.strategy.cost
        n = len(sessions)
        c_bar = self.strategy.mean_confidence  # observed per-token survival (accepted / drafted), from the policy
        k_cap = self.slo_cap_k(sessions)
        if k_cap == 0 or not self.gate(sessions, c_bar):
            return {v.key: DraftPlan() for v in sessions}
        efficiency = (n + n * c_bar) / self.step_ms(sessions, [1] * n)  # tokens per ms at k = 1
        # One more draft row and one more verified position, both in measured (scaled) time, as
        # the efficiency is: the slower the measured steps, the higher the bar.
        ctx = sum(v.context for v in sessions)
        verify_ms = cost.t_verify(2 * n + 1, ctx) - cost.t_verify(2 * n, ctx)
        marginal_ms = (cost.draft_per_seq + cost.draft_fixed / n + max(verify_ms, 0.0)) * self.time_scale
        bar = efficiency * marginal_ms / max(c_bar, 1e-6)
        plans = {}
        for v in sessions:
            need = 0.5 if v.behind_ms > 0 else 1.0
            plans[v.key] = DraftPlan(k_cap, stop_confidence=cal.inverse(min(bar * need, 1.0)))
        return plans

    def extend(self, sessions: list[SessionView], drafted: dict[str, Drafted], round_: int) -> dict[str, DraftPlan]:
        """After a drafting round: budgets for one more round, or {} to stop.

        Only `specserve` drafts in rounds (batch-uniform): before round s+1 it predicts G with each
        session's next C = C_{i,s} · c̄ and goes on only if that beats the G it has now; after a
        round that lowered G it stops. The confidences of rounds that did not lower G update c̄."""
        if self.strategy.mode != "specserve":
            return {}
        auto = [v for v in sessions if not v.mode and v.key in drafted]
        if not auto or any(len(drafted[v.key].tokens) < round_ for v in auto):
            return {}
        n = len(auto)
        cums = [drafted[v.key].cumulative() for v in auto]
        g_now = expected_tokens(cums) / self.step_ms(auto, [round_] * n)
        g_before = expected_tokens([c[:-1] for c in cums]) / self.step_ms(auto, [round_ - 1] * n)
        if g_now < g_before:
            return {}
        latest = [drafted[v.key].confidences[-1] for v in auto]
        self._confidence_sum += sum(latest)
        self._confidence_n += n
        if round_ >= min(self.strategy.max_draft_tokens, self.slo_cap_k(auto)):
            return {}
        predicted = [c + [c[-1] * self.running_confidence] for c in cums]
        g_next = expected_tokens(predicted) / self.step_ms(auto, [round_ + 1] * n)
        if g_next < g_now:
            return {}
        return {v.key: DraftPlan(1) for v in auto}

    def prune(self, sessions: list[SessionView], drafted: dict[str, Drafted]) -> dict[str, int]:
        """How many of each session's drafts to verify.

        `specserve`: confidence-prior pruning. If dropping positions shrinks the verify batch to the
        next smaller padded shape, drop them from the session with the lowest final C first, and
        keep the pruned plan only if its predicted G is not lower.
        `adaptive`: the slot budget. Rank every (session, position) slot by its calibrated Ĉ and
        admit slots while Ĉ > G · ΔT_verify; inside a padded shape ΔT is zero, so it fills up to
        the shape's edge. Other controllers verify everything they drafted.
        """
        keep = {k: len(d.tokens) for k, d in drafted.items()}
        mode, cost = self.strategy.mode, self.strategy.cost
        views = {v.key: v for v in sessions}
        auto = [k for k in keep if k in views and not views[k].mode and keep[k]]
        if mode not in ("specserve", "adaptive") or not auto:
            return keep
        ctx = sum(v.context for v in sessions)
        n = len(sessions)
        draft_ms = cost.t_draft(n, max(keep.values()))

        def g(plan: dict[str, int]) -> float:
            cums = [drafted[k].cumulative()[: plan[k]] for k in keep]
            if mode == "adaptive":
                cums = [[self.strategy.calibration(c) for c in cs] for cs in cums]
            return expected_tokens(cums) / (draft_ms + cost.t_verify(sum(plan.values()) + n, ctx))


        if mode == "specserve":
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
            return pruned if g(pruned) >= g(keep) else keep
        # adaptive: drop the least likely slot while that raises predicted G
        plan = dict(keep)
        while True:
            tails = [k for k in auto if plan[k]]
            if not tails:
                return plan
            worst = min(tails, key=lambda k: drafted[k].cumulative()[plan[k] - 1])
            trial = dict(plan, **{worst: plan[worst] - 1})
            if g(trial) <= g(plan):
                return plan
            plan = trial
