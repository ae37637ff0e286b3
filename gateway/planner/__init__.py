"""Per-step speculation planning: how far each session drafts this step, and what gets verified.

Every controller (one per file, chosen by the strategy's mode) reads the strategy's parameters and
the step's live draft confidences. A step runs in rounds: `plan` gives each session a budget; after
drafting, `extend` may ask for more (the batch-uniform `specserve` controller drafts one round per
position); `prune` then chooses how many of each session's drafts to verify. The Planner holds what
persists between steps: the strategy, the online step-time correction and specserve's c̄.
"""

from __future__ import annotations

from dataclasses import replace

from gateway.planner.adaptive import Adaptive
from gateway.planner.base import Controller, Drafted, DraftPlan, Hazard, SessionView, expected_tokens
from gateway.planner.efficiency_gate import EfficiencyGate
from gateway.planner.fixed import Static, Threshold
from gateway.planner.smartspec import SmartSpec
from specserve.strategy import PRIOR_MEAN_CONFIDENCE, CostModel, Strategy

__all__ = ["Drafted", "DraftPlan", "Hazard", "Planner", "SessionView", "expected_tokens"]

CONTROLLERS: dict[str, Controller] = {
    "static": Static(), "threshold": Threshold(), "smartspec": SmartSpec(), "specserve": EfficiencyGate(),
    "adaptive": Adaptive(),
}
COST_MODES = ("adaptive", "specserve", "smartspec")  # the controllers that decide from the cost model
OVERRIDE_REASONS = {"off": "speculation off for this request", "static": "static k = 0 requested"}

# The step-time correction: an exponential mean of measured / predicted time. Weight 0.3 follows a
# change within a few steps; the clamp keeps one outlier (a GC pause, a cold cache) from swinging it.
TIME_SCALE_WEIGHT = 0.3
# Steps that verify drafts get a correction of their own, over the plain steps' (on fresh text they
# are few, and measured 15-20% over the table's price while plain steps ran at it): slower, as they
# are rarer and noisier.
DRAFT_SCALE_WEIGHT = 0.1
MIN_DRAFT_SCALE, MAX_DRAFT_SCALE = 0.5, 2.0
# While drafting looks unprofitable, at most this share of decode time goes to probe drafts, so
# the acceptance estimates stay true (a gate closed by a prior would otherwise never learn).
EXPLORE_SHARE = 0.01
EXPLORE_DECAY = 0.995  # per step: the budget's window is a few hundred steps
MIN_TIME_SCALE, MAX_TIME_SCALE = 0.01, 100.0


# Before the policy has timed a free drafter: a lookup call costs about a millisecond.
FREE_DRAFT_PRIOR = CostModel(draft_fixed=1.0, draft_per_seq=0.1, draft_free=True)


class Planner:
    def __init__(self, strategy: Strategy, draft_free: bool = False, hybrid: bool = False):
        self.draft_free = draft_free  # the drafter runs no model (suffix, n-gram): a call costs what it measures
        self.hybrid = hybrid  # the drafter offers free suffix drafts beside its model's
        self.strategy = self._priced(strategy)
        self.reasons: dict[str, str] = {}  # why a session got no drafts in the last plan
        # specserve's c̄: the running mean of the draft confidences of every draft round that did not
        # lower G, over all steps; its prior counts as one observation.
        self._confidence_sum, self._confidence_n = PRIOR_MEAN_CONFIDENCE, 1  # the paper's initial c̄
        self.time_scale = 1.0  # measured / predicted step time, tracked online
        self.draft_scale = 1.0  # steps that verify drafts: their measured / predicted time over plain steps'
        self.prompt_tokens = 0  # prompt tokens prefilled in the step being planned (same forward)
        # Exploration: decode time and the extra time spent on probe drafts, both decayed per step
        # (a window of about 1 / (1 - EXPLORE_DECAY) steps); a probe runs only within the budget.
        self.decode_ms, self.explored_ms = 0.0, 0.0
        self.exploring = False  # the step being planned drafts only to keep the estimates true

    def set_strategy(self, strategy: Strategy) -> None:
        self.strategy = self._priced(strategy)

    def _priced(self, strategy: Strategy) -> Strategy:
        """With a free drafter, a strategy whose costs were fitted to a model drafter (or are the
        prior) prices drafting as a lookup call instead."""
        if not self.draft_free or strategy.cost.draft_free:
            return strategy
        p = FREE_DRAFT_PRIOR
        return replace(strategy, cost=replace(strategy.cost, draft_fixed=p.draft_fixed, draft_per_seq=p.draft_per_seq,
                                              draft_free=True))

    @property
    def controller(self) -> Controller | None:
        return CONTROLLERS.get(self.strategy.mode)

    # --- state kept between steps --------------------------------------------------------------
    def observe_step(self, predicted_ms: float, measured_ms: float, probe_ms: float = 0.0, forwards: int = 1,
                     prompt: bool = False, drafted: bool = False) -> None:
        """Correct the cost model online: an exponential mean of measured over predicted step time
        (the policy refits the coefficients; this keeps predictions honest between publications).
        `measured_ms`: per forward, of the step's `forwards` (a decode burst runs several);
        `probe_ms`: the extra time of the step's exploration drafts; `prompt`: the step read prompt
        tokens, whose time is no decoding to take exploration budget from; `drafted`: it verified
        drafts, whose time corrects the drafted steps' scale, not the plain steps'."""
        # Only the exploring controllers' decoding earns them budget.
        if self.strategy.mode in COST_MODES and not prompt:
            self.decode_ms = EXPLORE_DECAY * self.decode_ms + measured_ms * forwards
            self.explored_ms = EXPLORE_DECAY * self.explored_ms + probe_ms
        if predicted_ms <= 0 or measured_ms <= 0:
            return
        if drafted:
            ratio = min(max(measured_ms / predicted_ms * self.draft_scale, MIN_DRAFT_SCALE), MAX_DRAFT_SCALE)
            self.draft_scale = (1 - DRAFT_SCALE_WEIGHT) * self.draft_scale + DRAFT_SCALE_WEIGHT * ratio
        else:
            ratio = min(max(measured_ms / (predicted_ms / self.time_scale), MIN_TIME_SCALE), MAX_TIME_SCALE)
            self.time_scale = (1 - TIME_SCALE_WEIGHT) * self.time_scale + TIME_SCALE_WEIGHT * ratio

    def probe_ms(self, sessions: list[SessionView], free: bool, catchup: int, measured_ms: float) -> float:
        """What a probe step costs the exploration budget: its predicted time over a plain step's,
        the drafter's catch-up on `catchup` unread tokens included, or its measured time over the
        plain step's where that is more (a cost model that prices drafting low would otherwise let
        the probes overrun their share)."""
        n = len(sessions)
        predicted = self.step_ms(sessions, [1] * n, free=free) + self.reading_ms(catchup)
        return max(predicted, measured_ms) - self.step_ms(sessions, [0] * n)

    def reading_ms(self, tokens: int) -> float:
        """The drafter's reading of `tokens` unread tokens, priced as the verifier reads a prompt
        (an upper bound: the draft model is the smaller one)."""
        return self.strategy.cost.t_positions(tokens, prompt=True) * self.time_scale if tokens else 0.0

    def may_explore(self, extra_ms: float) -> bool:
        """Whether a probe step costing `extra_ms` more than plain decoding stays within the
        exploration budget (a share of the recent decode time)."""
        return extra_ms > 0 and self.explored_ms + extra_ms <= EXPLORE_SHARE * (self.decode_ms + extra_ms)

    def observe_confidences(self, confidences: list[float]) -> None:
        self._confidence_sum += sum(confidences)
        self._confidence_n += len(confidences)

    @property
    def running_confidence(self) -> float:
        return self._confidence_sum / self._confidence_n

    def survival(self, drafted: Drafted) -> list[float]:
        """Calibrated cumulative survival of a session's drafts (Ĉ), through its proposer's calibration."""
        cal = self.strategy.calibration_for(drafted.free, drafted.recalled)
        return [cal(c) for c in drafted.cumulative()]

    # --- the cost side -------------------------------------------------------------------------
    def step_ms(self, sessions: list[SessionView], ks: list[int], prompt_tokens: int | None = None,
                free: bool = False) -> float:
        """Predicted step time: drafting (nothing for `free` drafts), then one forward over the
        verify rows and the prompt tokens prefilled in the same step (the step's own by default)."""
        cost = self.strategy.cost
        ctx = sum(s.context for s in sessions)
        drafting = 0 if free else max(ks, default=0)
        prompt = self.prompt_tokens if prompt_tokens is None else prompt_tokens
        positions = sum(k + 1 for k in ks) + prompt
        return (cost.t_draft(len(sessions), drafting) + cost.t_verify(positions, ctx, prompt=prompt > 0)) \
            * self.time_scale * self.scale_for(sum(ks))

    def scale_for(self, drafts: int) -> float:
        """The drafted steps' correction for a step that verifies `drafts` drafts (1 for none)."""
        return self.draft_scale if drafts else 1.0

    def slo_cap_k(self, sessions: list[SessionView], free: bool = False) -> int:
        """The largest uniform k whose predicted step time fits the tightest TPOT SLO (0 always fits).
        `free`: for drafts that cost no model, which share the free drafter's longest draft among
        the batch (never fewer than K_max each): a long step delays every request arriving during it."""
        caps = [s.tpot_slo_ms for s in sessions if s.tpot_slo_ms > 0]
        strategy = self.strategy
        k = strategy.max_draft_tokens
        if free:
            k = max(strategy.max_free_draft_tokens // max(len(sessions), 1), min(k, strategy.max_free_draft_tokens))
        if not caps:
            return k
        while k > 0 and self.step_ms(sessions, [k] * len(sessions), free=free) > min(caps):
            k -= 1
        return k

    def catchup_ms(self, sessions: list[SessionView], amortized: bool = False) -> float:
        """The drafter's reading of the tokens it has not seen, before it can draft for these
        sessions (a free drafter indexes them for nothing); `amortized`: spread over the steps each
        session has left, the share one step of drafting must pay back. The drafter reads like the
        verifier prefills, at its own speed: the verifier's time for those tokens, scaled by the
        drafter's measured time for one draft step over the verifier's for one position."""
        cost = self.strategy.cost
        if cost.draft_free:
            return 0.0
        speed = min(cost.t_draft(1, 1) / max(cost.t_positions(1), 1e-9), 1.0)
        return sum(cost.t_positions(v.unread, prompt=True) / (v.remaining if amortized else 1) for v in sessions
                   if self._catching_up(v)) * speed * self.time_scale

    def catchup_tokens(self, sessions: list[SessionView]) -> int:
        """Tokens the drafter's model reads before drafting for these sessions, beyond a step's
        usual few (0 for a free drafter)."""
        return 0 if self.strategy.cost.draft_free else sum(v.unread for v in sessions if self._catching_up(v))

    def _catching_up(self, v: SessionView) -> bool:
        return v.unread > self.strategy.max_draft_tokens + 1

    def gate(self, sessions: list[SessionView], confidence: float) -> bool:
        """Speculate only if one draft per session at this confidence beats plain decoding, the
        drafter's catch-up on unread tokens paid back over the sessions' remaining steps."""
        n = len(sessions)
        plain = n / self.step_ms(sessions, [0] * n)
        one = (n + n * confidence) / (self.step_ms(sessions, [1] * n) + self.catchup_ms(sessions, amortized=True))
        return one > plain * self.strategy.gate_margin

    # --- the step's phases ---------------------------------------------------------------------
    def plan(self, sessions: list[SessionView]) -> dict[str, DraftPlan]:
        """Budgets for every session: per-request overrides as asked, the rest by the controller."""
        s = self.strategy
        self.exploring = False
        plans = {v.key: DraftPlan(v.static_k if v.mode == "static" else 0) for v in sessions}
        auto = [v for v in sessions if not v.mode]
        if auto and self.controller is not None and s.max_draft_tokens > 0:
            plans |= self.controller.plan(self, auto)
        for v in sessions:  # a verify emits its accepted drafts and one more token: none past the last
            plan = plans[v.key]
            plan.max_draft_tokens = min(plan.max_draft_tokens, v.remaining - 1)
        idle = [v for v in sessions if plans[v.key].max_draft_tokens <= 0]
        auto_reason = self._reason(auto) if any(not v.mode for v in idle) else ""
        self.reasons = {v.key: OVERRIDE_REASONS[v.mode] if v.mode else auto_reason for v in idle}
        return plans

    def _reason(self, auto: list[SessionView]) -> str:
        """Why the strategy gave these sessions no drafts this step."""
        mode = self.strategy.mode
        if mode == "off" or self.strategy.max_draft_tokens == 0:
            return f"mode {mode}" + (" (max_draft_tokens 0)" if mode != "off" else "")
        if mode in COST_MODES:
            if self.slo_cap_k(auto) == 0:
                return f"{mode}: the TPOT SLO leaves no time to draft"
            return f"{mode}: the cost model predicts plain decoding is faster here"
        return f"{mode}: no draft this step"

    def extend(self, sessions: list[SessionView], drafted: dict[str, Drafted], round_: int) -> dict[str, DraftPlan]:
        """After a drafting round: budgets for one more round, or {} to stop."""
        return self.controller.extend(self, sessions, drafted, round_) if self.controller else {}

    def prune(self, sessions: list[SessionView], drafted: dict[str, Drafted]) -> dict[str, int]:
        """How many of each session's drafts to verify (requests with their own mode keep all)."""
        keep = {k: len(d.tokens) for k, d in drafted.items()}
        views = {v.key: v for v in sessions}
        auto = [k for k in keep if k in views and not views[k].mode and keep[k]]
        if not auto or self.controller is None:
            return keep
        return self._probe_free(sessions, drafted, self.controller.prune(self, sessions, drafted, keep, auto), auto)

    def _probe_free(self, sessions: list[SessionView], drafted: dict[str, Drafted], keep: dict[str, int],
                    auto: list[str]) -> dict[str, int]:
        """Free drafts all pruned: now and then, within the exploration budget, the first of each
        session's is verified anyway. Otherwise a calibration that a few early rejections set low
        (fresh text, before any copying) would price every later copy low and never learn."""
        probe = [k for k in auto if drafted[k].free]
        if self.exploring or not probe or any(keep[k] for k in auto):
            return keep
        ks = [int(v.key in probe) for v in sessions]
        self.exploring = self.may_explore(self.step_ms(sessions, ks, free=True) - self.step_ms(sessions, [0] * len(ks)))
        return keep | {k: 1 for k in probe} if self.exploring else keep
