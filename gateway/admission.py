"""Admission control and SLO accounting.

At admission the gateway predicts the new request's TTFT from the queue ahead of it, the running
batch and the cost model. A request whose TTFT SLO cannot be met is rejected at once with
RESOURCE_EXHAUSTED and a retry hint, or, when it (or the `admission` ops key) asks for best
effort, queued and marked unattainable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.planner import SessionView
from gateway.scheduler import Scheduler
from gateway.sequence import Finish, Sequence
from specserve.errors import ResourceExhausted

ADMISSION_MODES = ("reject", "best_effort", "off")


@dataclass(frozen=True)
class Attainment:
    ttft: bool
    tpot: bool
    deadline: bool

    @property
    def slo(self) -> bool:
        return self.ttft and self.tpot and self.deadline


def attainment(seq: Sequence) -> Attainment:
    """Whether a finished request met its TTFT, its mean TPOT and its deadline (unset ones are met)."""
    ttft = not seq.slo.ttft_ms or (seq.first_token_at is not None and seq.ttft_ms <= seq.slo.ttft_ms)
    tpot = not seq.slo.tpot_ms or seq.tpot_ms <= seq.slo.tpot_ms
    deadline = seq.finish is not Finish.DEADLINE and (
        not seq.slo.deadline_ms or seq.last_token_at is not None and seq.last_token_at <= seq.deadline)
    ok = seq.finish not in (Finish.ERROR, Finish.CANCELLED)
    return Attainment(ttft and ok, tpot and ok, deadline and ok)


class Admission:
    def __init__(self, scheduler: Scheduler, mode: str = "reject", on_reject=None):
        self.scheduler = scheduler
        self.mode = mode
        self.on_reject = on_reject or (lambda seq: None)

    def predict_ttft_ms(self, seq: Sequence) -> float:
        """Prefill of everything queued ahead plus this prompt, in rounds of at most
        max_prefill_tokens, each round also running one decode step of the running batch; plus,
        when the batch is full, the decode steps until enough running requests finish."""
        sch = self.scheduler
        cost = sch.planner.strategy.cost
        key = seq.sort_key()
        ahead = [s for s in sch.waiting if s.sort_key() <= key]
        tokens = sum(len(s.prompt) for s in ahead) + len(seq.prompt)
        rounds = max(1, math.ceil(tokens / sch.config.max_prefill_tokens))
        views = [SessionView(s.id, s.position) for s in sch.running.values()]
        decode_ms = sch.planner.step_ms(views, [0] * len(views)) if views else 0.0
        prefill_ms = cost.verify_fixed * rounds + cost.verify_per_pos * tokens
        wait_ms = 0.0
        free = sch.config.max_batch_size - len(sch.running)
        if len(ahead) >= free and sch.running:
            remaining = sorted(s.params.max_new_tokens - len(s.generated) for s in sch.running.values())
            needed = min(len(ahead) - free + 1, len(remaining))
            wait_ms = remaining[needed - 1] * decode_ms
        return prefill_ms + rounds * decode_ms + wait_ms

    def admit(self, seq: Sequence) -> None:
        if self.mode == "off" or not seq.slo.ttft_ms:
            return
        predicted = self.predict_ttft_ms(seq)
        if predicted <= seq.slo.ttft_ms:
            return
        if seq.slo.best_effort or self.mode == "best_effort":
            seq.unattainable = True
            return
        self.on_reject(seq)
        raise ResourceExhausted(
            f"predicted time to first token {predicted:.0f} ms exceeds the SLO of {seq.slo.ttft_ms:.0f} ms; "
            "retry later or set slo.best_effort", retry_after_ms=int(predicted - seq.slo.ttft_ms) + 1)
