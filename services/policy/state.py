"""Turns the estimates into a strategy for the chosen algorithm."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from services.policy.estimators import AcceptanceEstimator, CalibrationEstimator, CostEstimator
from specserve.errors import InvalidArgument
from specserve.strategy import MAX_DRAFT_TOKENS_LIMIT, MODES, PRIOR_MEAN_CONFIDENCE, Strategy

RESUME_STEPS = 200  # step records a restarted policy learns from before its own fit replaces the resumed one


def parse_algorithm(name: str) -> tuple[str, int]:
    """`adaptive`, `specserve`, `smartspec`, `threshold`, `off` or `static:K` -> (mode, K)."""
    if name.startswith("static:"):
        try:
            k = int(name.split(":", 1)[1])
        except ValueError:
            raise InvalidArgument("algorithm", f"static needs an integer k, got {name!r}") from None
        if not 0 <= k <= MAX_DRAFT_TOKENS_LIMIT:
            raise InvalidArgument("algorithm", f"static k must be in [0, {MAX_DRAFT_TOKENS_LIMIT}], got {k}")
        return "static", k
    if name not in MODES or name == "static":
        raise InvalidArgument("algorithm", f"unknown algorithm {name!r}")
    return name, 4


@dataclass
class PolicyState:
    algorithm: str = "adaptive"
    name: str = "specserve-policy"
    ttl_s: float = 10.0
    cost: CostEstimator = field(default_factory=CostEstimator)
    calibration: CalibrationEstimator = field(default_factory=CalibrationEstimator)  # a draft model's drafts
    free_calibration: CalibrationEstimator = field(default_factory=CalibrationEstimator)  # a free proposer's
    recall_calibration: CalibrationEstimator = field(default_factory=CalibrationEstimator)  # its recalled drafts'
    acceptance: AcceptanceEstimator = field(default_factory=AcceptanceEstimator)  # every proposer's
    model_acceptance: AcceptanceEstimator = field(default_factory=AcceptanceEstimator)  # a draft model's only
    version: int = 0
    applied: int = 0
    resumed: Strategy | None = None  # the last published strategy, until this state has learned its own

    def resume(self, strategy: Strategy | None) -> None:
        """Go on from a strategy an earlier policy published: its versions, and its cost model,
        calibration and acceptance until RESUME_STEPS step records have been applied here (a
        restart must not turn speculation back on where the earlier run learned it does not pay;
        the model services' start-up profiles are not sent again)."""
        if strategy is not None:
            self.version, self.resumed = strategy.version, strategy

    def observe(self, record: dict) -> None:
        """Apply one record (raises KeyError/TypeError/ValueError when malformed). The gateway's
        step records carry the whole step, the model services' timings included, so the model
        services' per-call records are for dashboards; only their start-up profiles are applied."""
        component = record["component"]
        if record.get("call") == "profile":  # a model service's start-up profile seeds the cost model
            if component == "verifier":
                self.cost.observe(0, 0, 0.0, int(record["verified_positions"]), int(record["context_tokens"]),
                                  float(record["forward_ms"]), profile=True, prompt=record.get("prompt") is True)
            elif component == "drafter":
                self.cost.observe(int(record["batch_size"]), int(record["draft_steps"]), float(record["draft_ms"]),
                                  0, 0, 0.0, free=record.get("free", False) is True)
            return
        if component != "gateway":
            return
        # A decode burst ran several plain forwards in one call: the cost model prices one.
        forwards = max(int(record.get("forwards", 1)), 1)
        n, positions = int(record["batch_size"]), round(int(record["verified_positions"]) / forwards)
        # A step whose drafter caught up on a whole history timed reading, not drafting.
        catchup = int(record.get("draft_catchup_tokens", 0)) > 0
        free = record.get("draft_free", False) is True
        self.cost.observe(n, 0 if catchup and not free else int(record["draft_steps"]),
                          0.0 if catchup and free else float(record["draft_ms"]), positions,
                          int(record["context_tokens"]), float(record["verify_ms"]) / forwards, free=free,
                          prompt=int(record.get("prompt_tokens", 0)) > 0)
        confidences, outcomes = [float(c) for c in record["confidences"]], [int(o) for o in record["outcomes"]]
        free_slots = [int(f) for f in record.get("free_slots", ())] or [0] * len(confidences)
        for kind, estimator in enumerate((self.calibration, self.free_calibration, self.recall_calibration)):
            estimator.observe([c for c, f in zip(confidences, free_slots) if f == kind],
                              [o for o, f in zip(outcomes, free_slots) if f == kind])
        reached, accepted = ([int(v) for v in record.get(name, ())] for name in ("position_reached", "position_accepted"))
        free_reached, free_accepted = ([int(v) for v in record.get(name, ())] or [0] * len(reached)
                                       for name in ("free_position_reached", "free_position_accepted"))
        self.acceptance.observe(sum(int(d) for d in record["drafted"]), sum(int(a) for a in record["accepted"]),
                                reached, accepted)
        self.model_acceptance.observe(0, 0, [r - f for r, f in zip(reached, free_reached)],
                                      [a - f for a, f in zip(accepted, free_accepted)])
        self.applied += 1

    def decide(self) -> Strategy:
        mode, k = parse_algorithm(self.algorithm)
        self.version += 1
        if self.resumed is not None and self.applied < RESUME_STEPS:
            return dataclasses.replace(self.resumed, mode=mode, static_k=k, version=self.version,
                                       policy=f"{self.name}/{self.algorithm}", issued_at=time.time(),
                                       ttl_s=self.ttl_s).validate()
        acc = self.acceptance
        # c̄ prices a model's next draft: its own drafts' rate, every proposer's before it has drafted.
        per_token = next((c for c in (self.model_acceptance.conditional, acc.conditional) if c is not None),
                         PRIOR_MEAN_CONFIDENCE)
        free = self.free_calibration.fit()
        return Strategy(
            mode=mode, static_k=k, cost=self.cost.fit(), calibration=self.calibration.fit(),
            free_calibration=free, recall_calibration=self.recall_calibration.fit(prior=free),
            acceptance_rate=min(acc.rate, 0.99), mean_confidence=min(max(per_token, 0.05), 0.99),
            version=self.version, policy=f"{self.name}/{self.algorithm}", issued_at=time.time(), ttl_s=self.ttl_s,
        ).validate()
