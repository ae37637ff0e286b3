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
    remaining: int = 1 << 16  # tokens the session may still generate (steps left to pay back a catch-up)
    hazard: float = 1.0  # its drafts' rejections over the calibration's prediction (Hazard.ratio)


# A session's hazard ratio starts at 1 as if this many rejections had been predicted and seen; the
# counts decay per verified step, so a session turning from copying to fresh text is seen soon.
HAZARD_PRIOR = 1.0
HAZARD_DECAY = 0.9
MIN_HAZARD, MAX_HAZARD = 0.05, 20.0


@dataclass
class Hazard:
    """How a session's drafts fare against the calibration: its rejections over the rejections the
    calibrated survival predicted at the positions its verifies reached. Below 1 it copies better
    than the pooled calibration says (a code edit after many fresh answers), above 1 worse. The
    slot budget scales each draft's conditional rejection probability by it (proportional hazards)."""

    observed: float = 0.0
    predicted: float = 0.0

    def observe(self, survival: list[float], accepted: int) -> None:
        """One verify: `survival`, the calibrated cumulative survival of the drafts verified."""
        reached = survival[: accepted + 1]
        predicted = sum(1 - c / prev if prev > 0 else 1.0 for prev, c in zip([1.0, *reached], reached))
        self.observed = HAZARD_DECAY * self.observed + int(accepted < len(survival))
        self.predicted = HAZARD_DECAY * self.predicted + predicted

    @property
    def ratio(self) -> float:
        ratio = (HAZARD_PRIOR + self.observed) / (HAZARD_PRIOR + self.predicted)
        return min(max(ratio, MIN_HAZARD), MAX_HAZARD)


def corrected(survival: list[float], hazard: float) -> list[float]:
    """Cumulative survival with each position's conditional rejection probability times `hazard`."""
    out, prev, c = [], 1.0, 1.0
    for s in survival:
        q = s / prev if prev > 0 else 0.0
        c *= min(max(1 - (1 - q) * hazard, 0.0), 1.0)
        prev = s
        out.append(c)
    return out


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
    recalled: bool = False  # every draft so far was a free one recalled from other requests' outputs

    def add(self, tokens: list[int], confidences: list[float], free: bool, recalled: bool = False) -> None:
        self.free = free and (self.free or not self.tokens)
        self.recalled = self.free and recalled and (self.recalled or not self.tokens)
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
               draft_ms: float) -> float:
    """Predicted G of verifying plan[k] drafts of each session, the drafting (draft_ms) already done."""
    cost = p.strategy.cost
    cums = [drafted[k].cumulative()[: plan[k]] for k in plan]
    ctx = sum(v.context for v in sessions)
    return expected_tokens(cums) / (draft_ms + cost.t_verify(sum(plan.values()) + len(sessions) + p.prompt_tokens, ctx,
                                                                 prompt=p.prompt_tokens > 0))
