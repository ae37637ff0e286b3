"""Admission control and SLO accounting.

At admission the gateway predicts the new request's TTFT from the queue ahead of it, the running
batch and the cost model (prompts read one after another, each priced as the batched forwards it
will be; a request expected to generate the share of its max_new_tokens that finished requests
did), corrected online by measured TTFTs; an idle system admits every request whose TTFT SLO is
not below the fastest TTFT measured, whatever the cost model says. A request whose TTFT SLO cannot
be met is rejected at once with RESOURCE_EXHAUSTED and a retry hint, or, when it (or the
`admission` ops key) asks for best effort, queued and marked unattainable.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from gateway.planner import SessionView
from gateway.scheduler import Scheduler, view_of
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


# The TTFT correction: an exponential mean of measured / predicted TTFT over admitted requests,
# clamped so one outlier (a request queued behind a burst) cannot lock admission shut.
TTFT_SCALE_WEIGHT = 0.2
MIN_TTFT_SCALE, MAX_TTFT_SCALE = 0.5, 4.0
OUTPUT_SHARE_WEIGHT = 0.1  # the exponential mean of generated / max_new_tokens over finished requests


class Admission:
    def __init__(self, scheduler: Scheduler, mode: str = "reject", on_reject=None, margin: float = 1.0,
                 on_admit=None):
        self.scheduler = scheduler
        self.on_admit = on_admit or (lambda seq: None)
        self.mode = mode
        self.margin = margin  # predicted TTFT times this must fit the SLO
        self.on_reject = on_reject or (lambda seq: None)
        self.ttft_scale = 1.0  # measured / predicted TTFT, tracked online (see observe)
        self.fastest_ttft_ms = 0.0  # the fastest TTFT measured here: no request can do better
        self.output_share = 1.0  # generated / max_new_tokens of finished requests, tracked online

    def predict_ttft_ms(self, seq: Sequence) -> float:
        """Simulate the batch's places: each running request frees its place after the tokens it
        is expected to generate still, each request queued ahead (deadline order) takes the first
        free place, then this request takes the next one. Prompts are read one after another, as
        the scheduler reads them: a prompt's first token comes once the prompts ahead of it are
        read and its own is. The batch holds as many sessions as max_batch_size allows and a plain
        step of them fits the tightest TPOT SLO; steps are priced as plain steps of that batch,
        and a prefill as the forwards that carry its prompt beside the running sessions' decode
        rows (chunks of max_prefill_tokens). Times the TTFT correction learned from measured TTFTs."""
        sch = self.scheduler
        key = seq.sort_key()
        running = list(sch.running.values())
        ahead = sorted((s for s in [*sch.prefilling, *sch.resync, *sch.waiting] if s is not seq and s.sort_key() <= key),
                       key=Sequence.sort_key)
        views = [view_of(s) for s in [*running, *ahead, seq]]
        places = self._places(views)
        batch = views[: min(places, len(running))]
        full = views[:places]
        step_ms = sch.planner.step_ms(full, [0] * len(full), 0)
        free = [self.expected_remaining(s) * step_ms for s in running]
        free += [0.0] * max(0, places - len(free))
        heapq.heapify(free)
        read = 0.0  # when the prompts ahead are read
        for s in ahead:
            read = max(read, heapq.heappop(free)) + self._prefill_ms(s, batch)
            heapq.heappush(free, read + self.expected_remaining(s) * step_ms)
        return (max(free[0], read) + self._prefill_ms(seq, batch)) * self.ttft_scale

    def _prefill_ms(self, seq: Sequence, batch: list[SessionView]) -> float:
        """Reading the rest of a prompt (less what the prefix cache holds): chunks of
        max_prefill_tokens, each in a forward beside the batch's decode rows."""
        sch = self.scheduler
        zeros, chunk = [0] * len(batch), max(1, sch.config.max_prefill_tokens)
        whole, rest = divmod(sch.unread(seq), chunk)
        ms = whole * sch.planner.step_ms(batch, zeros, chunk)
        return ms + (sch.planner.step_ms(batch, zeros, rest) if rest else 0.0)

    def _queued_ahead(self, seq: Sequence) -> None:
        """An admitted request that sorts before requests already queued reads its prompt before
        theirs: their predicted TTFTs grow by its reading, so the TTFT correction learns the cost
        model's error and not the queue's reordering."""
        behind = [s for s in self.scheduler.waiting if s is not seq and s.sort_key() > seq.sort_key()]
        if behind:
            ms = self._prefill_ms(seq, [view_of(s) for s in self.scheduler.running.values()]) * self.ttft_scale
            for s in behind:
                if s.predicted_ttft_ms > 0:
                    s.predicted_ttft_ms += ms

    def expected_remaining(self, seq: Sequence) -> int:
        """Tokens a request is expected to generate still: its max_new_tokens times the share of
        max_new_tokens that finished requests generated (most stop early), at least one."""
        expected = round(self.output_share * seq.params.max_new_tokens)
        return max(1, min(expected, seq.params.max_new_tokens) - len(seq.generated))

    def _places(self, views: list[SessionView]) -> int:
        """Sessions the batch holds: up to max_batch_size, while a plain step of them fits the
        tightest TPOT SLO among them (at least one)."""
        sch = self.scheduler
        n = min(len(views), sch.config.max_batch_size)
        while n > 1 and not sch._fits(views[:n]):
            n -= 1
        return n if n < len(views) else sch.config.max_batch_size

    def observe(self, seq: Sequence) -> None:
        """A finished request: correct the TTFT prediction by its measured TTFT, and the expected
        output length by what it generated. The prediction is of the soonest first token; a prompt
        the scheduler held back for the running sessions' TPOT came later on purpose, so its TTFT
        can only show the prediction too slow, never too fast."""
        if seq.finish in (Finish.EOS, Finish.STOP, Finish.LENGTH) and seq.params.max_new_tokens > 0:
            share = len(seq.generated) / seq.params.max_new_tokens
            self.output_share = (1 - OUTPUT_SHARE_WEIGHT) * self.output_share + OUTPUT_SHARE_WEIGHT * share
        if seq.first_token_at is not None:
            self.fastest_ttft_ms = min(self.fastest_ttft_ms or seq.ttft_ms, seq.ttft_ms)
        if seq.predicted_ttft_ms > 0 and seq.first_token_at is not None:
            ratio = seq.ttft_ms / (seq.predicted_ttft_ms / self.ttft_scale)
            if seq.held_back:  # it waited on purpose, within its slack: only a sooner TTFT teaches
                ratio = min(ratio, 1.0)
            ratio = min(max(ratio, MIN_TTFT_SCALE), MAX_TTFT_SCALE)
            self.ttft_scale = (1 - TTFT_SCALE_WEIGHT) * self.ttft_scale + TTFT_SCALE_WEIGHT * ratio

    @property
    def idle(self) -> bool:
        sch = self.scheduler
        return not (sch.running or sch.waiting or sch.prefilling or sch.resync)

    def shortfall_ms(self, seq: Sequence) -> float:
        """How far the predicted TTFT (with the margin) overshoots the SLO; <= 0 means it fits. On
        an idle system only the measured cost of its own prefill counts (no margin, no correction)."""
        seq.predicted_ttft_ms = self.predict_ttft_ms(seq)
        if self.mode == "off" or not seq.slo.ttft_ms:
            return 0.0
        if self.idle:
            return seq.predicted_ttft_ms / self.ttft_scale - seq.slo.ttft_ms
        return seq.predicted_ttft_ms * self.margin - seq.slo.ttft_ms

    def admit(self, seq: Sequence) -> None:
        """Admit (possibly marked unattainable) or raise ResourceExhausted with a retry hint. An idle
        system admits every request unless its TTFT SLO is below the fastest TTFT measured here."""
        over = self.shortfall_ms(seq)
        if over <= 0:
            self._queued_ahead(seq)
            self.on_admit(seq)
            return
        possible = seq.slo.ttft_ms >= self.fastest_ttft_ms
        if seq.slo.best_effort or self.mode == "best_effort" or (self.idle and possible):
            # An idle system serves it at once whatever the prediction, so a cost model far off
            # the machine (a profile measured while it was busy) never locks admission shut: the
            # admitted request's steps and TTFT correct it.
            seq.unattainable = True
            self._queued_ahead(seq)
            self.on_admit(seq)
            return
        if self.idle:  # faster than any first token measured here, whatever the cost model says
            over = self.fastest_ttft_ms - seq.slo.ttft_ms
        self.on_reject(seq)
        raise ResourceExhausted(
            f"predicted time to first token {over + seq.slo.ttft_ms:.0f} ms exceeds the SLO of "
            f"{seq.slo.ttft_ms:.0f} ms by {over:.0f} ms; retry later or set slo.best_effort",
            retry_after_ms=int(over) + 1)
