"""Admission control and SLO accounting.

At admission the gateway predicts the new request's TTFT from the queue ahead of it, the running
batch and the cost model. A request whose TTFT SLO cannot be met is rejected at once with
RESOURCE_EXHAUSTED and a retry hint, or, when it (or the `admission` ops key) asks for best
effort, queued and marked unattainable.
"""

from __future__ import annotations

import heapq
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
    def __init__(self, scheduler: Scheduler, mode: str = "reject", on_reject=None, margin: float = 1.25,
                 on_admit=None):
        self.scheduler = scheduler
        self.on_admit = on_admit or (lambda seq: None)
        self.mode = mode
        self.margin = margin  # predicted TTFT times this must fit the SLO: step times vary
        self.on_reject = on_reject or (lambda seq: None)

    def predict_ttft_ms(self, seq: Sequence) -> float:
        """Simulate the batch slots: each running request frees its slot after its remaining
        tokens, each request queued ahead (deadline order) takes the first free slot for its
        prefill and all its tokens, then this request takes the next one. Steps are priced as
        plain decoding of a full batch and prefills one by one, so the estimate errs long. The
        prefill work ahead (prompts being prefilled or re-prefilled, and those queued ahead) also
        shares one budget of max_prefill_tokens per step, each step paying a decode step too: the
        prediction is the later of the two."""
        sch = self.scheduler
        cost = sch.planner.strategy.cost
        key = seq.sort_key()
        in_prefill = [*sch.prefilling, *sch.resync]
        ahead = sorted((s for s in sch.waiting if s is not seq and s.sort_key() <= key), key=Sequence.sort_key)
        batch = max(1, min(sch.config.max_batch_size, len(sch.running) + len(ahead) + 1))
        contexts = [s.position for s in sch.running.values()] + [len(s.prompt) for s in ahead] + [len(seq.prompt)]
        mean_ctx = sum(contexts) // len(contexts)
        step_ms = sch.planner.step_ms([SessionView("", mean_ctx)] * batch, [0] * batch)

        def prefill_ms(s: Sequence) -> float:
            return cost.t_verify(len(s.prompt), len(s.prompt)) * sch.planner.time_scale

        slots = [max(0, s.params.max_new_tokens - len(s.generated)) * step_ms for s in sch.running.values()]
        slots += [0.0] * max(0, sch.config.max_batch_size - len(slots))
        heapq.heapify(slots)
        for s in ahead:
            free_at = heapq.heappop(slots)
            heapq.heappush(slots, free_at + prefill_ms(s) + s.params.max_new_tokens * step_ms)
        by_slots = slots[0] + prefill_ms(seq) + (step_ms if sch.running else 0.0)
        tokens_ahead = sum(len(s.tokens) - s.prefilled for s in in_prefill) + sum(len(s.prompt) for s in ahead)
        chunks = math.ceil((tokens_ahead + len(seq.prompt)) / max(1, sch.config.max_prefill_tokens))
        by_budget = sum(prefill_ms(s) for s in [*in_prefill, *ahead, seq]) + chunks * (step_ms if sch.running else 0.0)
        return max(by_slots, by_budget)

    def shortfall_ms(self, seq: Sequence) -> float:
        """How far the predicted TTFT (with the margin) overshoots the SLO; <= 0 means it fits."""
        if self.mode == "off" or not seq.slo.ttft_ms:
            return 0.0
        return self.predict_ttft_ms(seq) * self.margin - seq.slo.ttft_ms

    def admit(self, seq: Sequence) -> None:
        """Admit (possibly marked unattainable) or raise ResourceExhausted with a retry hint."""
        over = self.shortfall_ms(seq)
        if over <= 0:
            self.on_admit(seq)
            return
        if seq.slo.best_effort or self.mode == "best_effort":
            seq.unattainable = True
            self.on_admit(seq)
            return
        self.on_reject(seq)
        raise ResourceExhausted(
            f"predicted time to first token {over + seq.slo.ttft_ms:.0f} ms exceeds the SLO of {seq.slo.ttft_ms:.0f} ms; "
            "retry later or set slo.best_effort", retry_after_ms=int(over) + 1)
