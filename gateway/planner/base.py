"""What every controller shares: the views it plans over, its small interface, and the cost and
efficiency helpers. Notation (docs/design.md section 4): n sessions, C_{i,j} the cumulative draft
confidence of session i after j drafts, T_draft(n, k) and T_verify(N, ctx) the cost model,
G = E[tokens] / T_step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.planner import Planner


@dataclass
class SessionView:
    """What the planner sees of one running session."""

    key: str
    context: int  # committed tokens
    tpot_slo_ms: float = 0.0  # 0: none
    behind_ms: float = 0.0  # how far the session is behind its TPOT schedule (> 0 is late)
    mode: str = ""  # a per-request override of the strategy's mode ("off", "static")
    static_k: int = 0
    unread: int = 0  # committed tokens the drafter has not read: it reads them before its next draft
    remaining: int = 1  # tokens the session may still generate (steps left to pay back a catch-up)


@dataclass
class DraftPlan:
    max_draft_tokens: int = 0
    stop_confidence: float = 0.0  # on the raw cumulative confidence
    min_token_confidence: float = 0.0
    free_only: bool = False  # only drafts that cost no model (a hybrid drafter's suffix lookup)
    max_model_draft_tokens: int = 0  # most of them a model drafts (a hybrid's suffix may go on); 0: all


@dataclass
class Drafted:
    """A session's drafts so far this step."""

    tokens: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    free: bool = False  # every draft so far came from a proposer that runs no model

    def add(self, tokens: list[int], confidences: list[float], free: bool) -> None:
        self.free = free and (self.free or not self.tokens)
        self.tokens += tokens
        self.confidences += confidences

    def cumulative(self) -> list[float]:
        out, c = [], 1.0
        for p in self.confidences:
            c *= p
            out.append(c)
        return out


def expected_tokens(cumulative: list[list[float]]) -> float:
    """E[tokens] = n + sum_i sum_j C_{i,j}."""
    return len(cumulative) + sum(sum(c) for c in cumulative)


class Controller:
    """One speculation algorithm. `plan` gives each session a budget; after a drafting round
    `extend` may ask for another (or {} to stop); `prune` says how many drafts of each session to
    verify. The planner passes itself for the strategy, the cost helpers and its running state."""

    def plan(self, p: Planner, sessions: list[SessionView]) -> dict[str, DraftPlan]:
        raise NotImplementedError

    def extend(self, p: Planner, sessions: list[SessionView], drafted: dict[str, Drafted], round_: int
               ) -> dict[str, DraftPlan]:
        return {}

    def prune(self, p: Planner, sessions: list[SessionView], drafted: dict[str, Drafted], keep: dict[str, int],
              auto: list[str]) -> dict[str, int]:
        return keep


def efficiency(p: Planner, sessions: list[SessionView], drafted: dict[str, Drafted], plan: dict[str, int],
               draft_ms: float, calibrated: bool = False) -> float:
    """Predicted G of verifying plan[k] drafts of each session, the drafting (draft_ms) already done;
    with `calibrated`, through the strategy's calibration of each session's proposer (Ĉ instead of raw C)."""
    cost = p.strategy.cost
    cums = [drafted[k].cumulative()[: plan[k]] for k in plan]
    if calibrated:
        cals = [p.strategy.calibration_for(drafted[k].free) for k in plan]
        cums = [[cal(c) for c in cs] for cal, cs in zip(cals, cums)]
    ctx = sum(v.context for v in sessions)
    return expected_tokens(cums) / (draft_ms + cost.t_verify(sum(plan.values()) + len(sessions) + p.prompt_tokens, ctx))
