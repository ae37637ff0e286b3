"""Continuous batching and the draft/verify step loop.

Each iteration is one step, one forward on each model service: drop cancelled and expired requests,
choose the prompt chunks that join the step (a token budget from the running sessions' TPOT slack,
a batch that grows only while its plain step fits the tightest TPOT SLO), then plan, propose (in
rounds when the controller asks), prune, and verify the running batch together with those prompt
chunks in one verifier call, and stream what was committed. The drafter reads a prompt at its
session's first draft round, never alongside the verifier.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from gateway.backends import DrafterBackend, VerifierBackend
from gateway.planner import Drafted, DraftPlan, Planner, SessionView
from gateway.prefixes import CachedPrefixes
from gateway.sequence import Delta, Finish, Sequence, Status
from gateway.textstream import TextStream
from specserve.background import Background, Tasks
from specserve.contracts import (
    PrefillItem,
    ProposeItem,
    SamplingParams,
    SessionStatus,
    Sparse,
    VerifyItem,
    VerifyOutput,
)
from specserve.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, SpecServeError, Unavailable
from specserve.strategy import Strategy

log = logging.getLogger(__name__)

MAX_STEP_FAILURES = 3  # a step that fails this often in a row fails its requests
STEP_RETRY_S = 0.1  # pause before retrying a failed step (a transient fault may clear)
PROBE_SESSION, PROBE_TOKEN = "drafter-probe", 1  # the recovery probe's session and its one token
# A step carrying prompt chunks is sized to this share of the running sessions' slack: such steps
# ran up to 10% past their prediction, and a short answer has few tokens to make up a late one.
SCHEDULE_HEADROOM = 0.9
NO_ROOM_RETRY_MS = 1000  # a prompt the verifier had no KV room for: running sessions free room soon
# A burst after a step that asked for drafts and got none runs at most this many forwards: the
# next step may find some (a copied run starting) and a burst cannot look. Each further such step
# in a row doubles it (up to `max_plain_steps`): text that copies nothing stops paying for looking.
LOOKOUT_STEPS = 4


@dataclass
class SchedulerConfig:
    max_batch_size: int = 16
    max_queued: int = 256
    max_prefill_tokens: int = 2048  # prompt tokens prefilled per step (one prompt always fits)
    call_timeout_s: float = 120.0  # cap on any downstream call (a long prefill on a slow CPU takes a while)
    drafter_retry_s: float = 2.0  # after a drafter failure, plain decoding for this long
    # A draft call may take this many times its predicted time (never less than the floor) before
    # the step goes on as plain decoding; after `drafter_max_misses` misses in a row the drafter is
    # left alone until it answers a health check.
    draft_timeout_factor: float = 3.0
    draft_timeout_floor_s: float = 0.5
    drafter_max_misses: int = 3
    # A step with neither drafts nor prompts, while no request waits, decodes up to this many tokens
    # per session in one verify call, within `max_burst_ms` of predicted time; a request arriving
    # meanwhile ends the burst after its current forward. On 2 cores, bursts of up to 16 against 4
    # took 6-7% off the time per output token at 1 client over HTTP and tied at 4 clients (each
    # call's round trips, step loop, telemetry and stream events, and the CPU they take from the
    # forward, are paid per burst).
    max_plain_steps: int = 16
    max_burst_ms: float = 500.0
    # After a step that ended requests, while others run, the next step waits up to this long for
    # as many new requests (it starts as soon as they are there): a client in a closed loop sends
    # its next request right after its answer, which then goes into that step instead of waiting
    # out a whole decode burst or speculative step. Not while a running session is behind its TPOT
    # schedule.
    linger_ms: float = 20.0


@dataclass
class StepRecord:
    """What one step did, for telemetry and metrics (raw counts and times)."""

    step_id: int
    batch_size: int
    verified_positions: int
    draft_steps: int
    drafted: list[int]  # per session
    accepted: list[int]  # per session
    position_accepted: list[int]  # per draft position: sessions whose draft there was accepted
    position_drafted: list[int]  # per draft position: sessions that verified a draft there
    confidences: list[float]  # raw cumulative confidence of each verified draft position
    outcomes: list[int]  # 1 if that draft position was accepted
    predicted_step_ms: float
    draft_ms: float
    verify_ms: float
    step_ms: float
    planner_ms: float
    queue_depth: int
    running: int
    context_tokens: int
    strategy_version: int
    mode: str
    pruned: int = 0  # drafted slots the planner did not verify
    prompt_tokens: int = 0  # prompt tokens prefilled in the same forward (in verified_positions)
    draft_free: bool = False  # the drafter runs no model: its time is per call
    explored: bool = False  # a probe step: drafted although the estimates said plain decoding
    probe_ms: float = 0.0  # a probe step's predicted extra time over plain decoding (the exploration budget's charge)
    # per draft position: sessions whose drafts before it were all accepted (so it was tested);
    # accepted / reached there is the conditional acceptance rate at that position
    position_reached: list[int] = field(default_factory=list)
    draft_catchup_tokens: int = 0  # tokens the drafter re-read to catch up (their time is not drafting)
    forwards: int = 1  # forward passes in the step's verify call (a decode burst runs several)
    # which verified draft positions (in `confidences`' order) a model drafted (0), a free proposer (1)
    # from the session's own tokens or (2) recalled from other requests' outputs, and the free
    # proposer's share of `position_reached` / `position_accepted`
    free_slots: list[int] = field(default_factory=list)
    free_position_reached: list[int] = field(default_factory=list)
    free_position_accepted: list[int] = field(default_factory=list)


@dataclass
class _Step:
    """What one decode step gathers as its phases run, for the verify call and the step record."""

    seqs: list[Sequence]
    started: float = field(default_factory=time.perf_counter)
    views: list[SessionView] = field(default_factory=list)
    drafted: dict[str, Drafted] = field(default_factory=dict)
    dists: dict[str, list[Sparse]] = field(default_factory=dict)
    draft_ns: int = 0
    draft_steps: int = 0
    planner_s: float = 0.0
    catchup: int = 0
    keep: dict[str, int] = field(default_factory=dict)
    predicted_ms: float = 0.0
    items: list[VerifyItem] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    outcomes: list[int] = field(default_factory=list)
    position_accepted: list[int] = field(default_factory=list)
    position_drafted: list[int] = field(default_factory=list)
    position_reached: list[int] = field(default_factory=list)
    free_slots: list[int] = field(default_factory=list)
    free_position_reached: list[int] = field(default_factory=list)
    free_position_accepted: list[int] = field(default_factory=list)
    explored: bool = False
    prompt_tokens: int = 0  # prompt tokens prefilled in the same forward (read, not taken from the cache)
    free: bool = False  # every verified draft came from a free proposer
    asked: bool = False  # the plan asked the drafter for drafts

    def __post_init__(self) -> None:
        self.views = [view_of(s) for s in self.seqs]
        self.drafted = {s.id: Drafted() for s in self.seqs}
        self.dists = {s.id: [] for s in self.seqs}


def view_of(seq: Sequence) -> SessionView:
    return SessionView(seq.id, seq.position, seq.slo.tpot_ms, seq.behind_ms, seq.mode, seq.static_k,
                       unread=seq.position - seq.drafter_position + seq.model_unread,
                       remaining=max(seq.params.max_new_tokens - len(seq.generated), 1), hazard=seq.hazard.ratio)


class Scheduler(Background):
    def __init__(self, verifier: VerifierBackend, drafter: DrafterBackend | None, tokenizer, eos_ids: list[int],
                 config: SchedulerConfig, strategy: Strategy | None = None, on_step=None, on_finish=None,
                 draft_free: bool = False, hybrid: bool = False):
        self.verifier, self.drafter, self.tokenizer = verifier, drafter, tokenizer
        self.eos_ids = set(eos_ids)
        self.config = config
        self.planner = Planner(strategy or Strategy(), draft_free, hybrid)
        self.waiting: list[Sequence] = []
        self.running: dict[str, Sequence] = {}
        self.resync: list[Sequence] = []  # running sessions the verifier lost; prefilled again
        self.prefilling: list[Sequence] = []  # in the middle of a chunked prefill
        self.chunked: list[Sequence] = []  # queued requests whose prompt chunks the current step carries
        self.streams: dict[str, TextStream] = {}
        self.prefixes = CachedPrefixes()  # what the verifier's prefix cache likely holds, for pricing
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()  # set while there is no request to serve
        self.idle.set()
        self.drafter_down_until = 0.0
        self.drafter_misses = 0  # draft calls in a row that failed or missed their deadline
        self.step_id = 0
        self.on_step = on_step or (lambda record: None)
        self.on_finish = on_finish or (lambda seq: None)
        self._to_release: list[str] = []
        self.ended = 0  # requests the last step ended: their clients may send the next ones at once
        self.bursting = False  # a decode burst's verify call is under way
        self.unfruitful = 0  # steps in a row that asked for drafts and verified none
        self.tasks = Tasks()  # the drafter probe, ending a burst
        self.releases = Tasks()  # freeing ended sessions on the model services; waited for, never cancelled

    # --- admission ---------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def drafter_available(self) -> bool:
        return self.drafter is not None and time.monotonic() >= self.drafter_down_until

    def submit(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_queued:
            raise ResourceExhausted(f"queue is full ({self.config.max_queued} waiting)", retry_after_ms=1000)
        eos = set() if seq.ignore_eos else self.eos_ids
        self.streams[seq.id] = TextStream(self.tokenizer, eos, seq.params.max_new_tokens, seq.params.stop)
        self.waiting.append(seq)
        self.idle.clear()
        self.wake.set()
        self._end_burst_soon()  # it goes in after the burst's current forward, not its last

    def _end_burst_soon(self) -> None:
        if self.bursting:
            self.bursting = False
            self.tasks.spawn(self._end_burst(), "end-burst")

    async def _end_burst(self) -> None:
        try:
            await self.verifier.end_burst(timeout=self.config.call_timeout_s)
        except SpecServeError as exc:  # the burst runs its course; the request waits for it
            log.warning("could not end the decode burst: %s", exc)

    def cancel(self, seq: Sequence) -> None:
        """Called when the client goes away; the session is freed at the next step boundary, a
        burst under way ending after its current forward."""
        seq.cancelled = True
        self.wake.set()
        self._end_burst_soon()

    # --- the loop ----------------------------------------------------------------------------
    async def stop(self) -> None:
        await super().stop()
        await self.tasks.stop()
        for seq in [*self.waiting, *self.prefilling, *self.resync, *self.running.values()]:
            self._finish(seq, Finish.ERROR, Unavailable("gateway is shutting down"))
        self._release()
        await self.releases.wait()

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self.waiting and not self.running and not self.resync and not self.prefilling:
                self.wake.clear()
                self._release()
                self.idle.set()
                await self.wake.wait()
                self.idle.clear()
            try:
                await self.step()
                failures = 0
            except Exception as exc:
                failures += 1
                log.exception("step failed (%d in a row)", failures)
                if failures >= MAX_STEP_FAILURES:
                    # The same failure every time: end the affected requests instead of hanging them.
                    for seq in [*self.prefilling, *self.resync, *self.running.values(), *self.chunked]:
                        self._finish(seq, Finish.ERROR, Unavailable(f"the step failed {failures} times: {exc}"))
                    failures = 0
                await asyncio.sleep(STEP_RETRY_S)

    async def step(self) -> None:
        """One forward on each model service: the running sessions' draft and verify, with the
        prompt chunks the step's token budget allows in the verifier's same call."""
        await self._linger()
        self._reap()
        chunks = self._select_prefill()
        self.chunked = [s for s, _ in chunks]  # queued requests whose prompts this step carries
        if self.running or chunks:
            await self._step(chunks)
        self._release()

    async def _linger(self) -> None:
        """After a step that ended requests, wait up to `linger_ms` for as many new ones (see
        SchedulerConfig): a speculative step often ends several at once."""
        ended, self.ended = self.ended, 0
        if not ended or self.config.linger_ms <= 0 or not self.running \
                or any(s.behind_ms > 0 for s in self.running.values()):
            return
        deadline = time.monotonic() + self.config.linger_ms / 1000
        while len(self.waiting) < ended and (left := deadline - time.monotonic()) > 0:
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), left)
            except TimeoutError:
                return

    def _reap(self) -> None:
        now = time.monotonic()
        for seq in [*self.waiting, *self.prefilling, *self.resync, *self.running.values()]:
            if seq.cancelled:
                self._finish(seq, Finish.CANCELLED)
            elif seq.deadline is not None and now > seq.deadline:
                self._finish(seq, Finish.DEADLINE)

    def _draft_timeout(self, seqs: list[Sequence], items: list[ProposeItem], catchup: int) -> float:
        """A small multiple of the predicted draft time (with a floor), within the batch's budget.
        The `catchup` tokens the drafter's model reads first are priced by `Planner.reading_ms`."""
        k = max(i.max_draft_tokens for i in items)
        planner = self.planner
        predicted_s = (planner.strategy.cost.t_draft(len(items), k) * planner.time_scale + planner.reading_ms(catchup)) / 1000
        allowed = max(self.config.draft_timeout_floor_s, self.config.draft_timeout_factor * predicted_s)
        return min(self._timeout(seqs), allowed)

    async def _drafter_missed(self, exc: Exception) -> None:
        """Plain decoding for a while; after repeated misses, until the drafter answers a health check."""
        self.drafter_misses += 1
        self.drafter_down_until = time.monotonic() + self.config.drafter_retry_s
        log.warning("drafter failed (%s); plain decoding for %.1fs", exc, self.config.drafter_retry_s)
        if self.drafter_misses >= self.config.drafter_max_misses:
            log.warning("drafter missed %d calls in a row; plain decoding until it answers a health check",
                        self.drafter_misses)
            self.drafter_down_until = float("inf")
            if not self.tasks.has("probe-drafter"):
                self.tasks.spawn(self._probe_drafter(), "probe-drafter")

    async def _probe_drafter(self) -> None:
        """Until the drafter drafts again: a real (one-token) Propose, not Info, which a drafter
        stuck in a draft would still answer."""
        probe = [ProposeItem(PROBE_SESSION, 0, [PROBE_TOKEN], 1, SamplingParams())]
        while True:
            await asyncio.sleep(self.config.drafter_retry_s)
            try:
                await self.drafter.propose(probe, timeout=self.config.draft_timeout_floor_s)
                await self.drafter.release([PROBE_SESSION], timeout=self.config.draft_timeout_floor_s)
            except SpecServeError as exc:
                log.debug("drafter still not drafting: %s", exc)
                continue
            self.drafter_misses, self.drafter_down_until = 0, 0.0
            log.info("drafter answers again; speculation resumes")
            return

    def _timeout(self, seqs: list[Sequence]) -> float:
        """The remaining budget of the batch: the latest deadline among its requests, capped."""
        now = time.monotonic()
        deadlines = [s.deadline for s in seqs]
        if not seqs or any(d is None for d in deadlines):
            return self.config.call_timeout_s
        return max(0.05, min(self.config.call_timeout_s, max(deadlines) - now))

    # --- prefill: which prompt tokens join the step ----------------------------------------------
    def _select_prefill(self) -> list[tuple[Sequence, int]]:
        """Prompt chunks for this step (stall-free batching): sessions in the middle of a chunked
        prefill first, then those the verifier lost, then the queue in deadline order. A new
        session joins only while the predicted plain step of the grown batch fits the tightest
        TPOT SLO (and max_batch_size); the chunks share a token budget sized so the predicted step
        keeps every running session on its TPOT schedule. Prompts are read one after another
        unless sharing a forward lowers their first tokens' times: on a compute-bound device a
        second prompt in the same forward holds the first one's first token back by its own
        reading time and brings its own no sooner. A request whose TTFT the budget cannot make
        takes, whatever the budget, the smallest chunk per step that still reads it in time."""
        views = [view_of(s) for s in self.running.values()]
        budget = self._prompt_budget(views)
        slack_bound = budget < self.config.max_prefill_tokens  # the running sessions' TPOT limits it
        members = len(self.running) + len(self.prefilling)
        self.waiting.sort(key=Sequence.sort_key)
        batch: list[tuple[Sequence, int]] = []
        reading = 0
        for seq in [*self.prefilling, *self.resync, *self.waiting]:
            joining = seq not in self.prefilling
            if joining and (members >= self.config.max_batch_size or not self._fits(views + [view_of(seq)])):
                break
            # A prompt's cached prefix goes with its first chunk and costs no reading.
            seq.expect_cached = 0 if seq.prefilled else self._cached(seq)
            remaining = len(seq.tokens) - seq.prefilled - seq.expect_cached
            take = min(remaining, budget)
            if take > 0 and batch and not self._rides_free(views, reading, take):
                take = 0  # read after the prompts ahead, as admission predicts
            elif slack_bound and take < remaining:
                seq.held_back = True
            take = max(take, min(remaining, self._ttft_need(seq, views, remaining), self.config.max_prefill_tokens))
            if take <= 0:
                break
            batch.append((seq, seq.expect_cached + take))
            reading += take
            budget -= take
            members += joining
            if joining:
                views.append(view_of(seq))
        return batch

    def _cached(self, seq: Sequence) -> int:
        """Prompt tokens of a queued request the verifier will likely take from its prefix cache."""
        return self.prefixes.cached(seq.tokens, (s.tokens for s in self.running.values()))

    def unread(self, seq: Sequence) -> int:
        """Prompt tokens the verifier has still to compute for a queued request."""
        return len(seq.tokens) - (seq.prefilled or self._cached(seq))

    def _rides_free(self, views: list[SessionView], taken: int, more: int) -> bool:
        """Whether `more` prompt tokens join a step already carrying `taken` for less than they
        save: together, both first tokens come at T(taken + more); one after another, at
        T(taken) and T(taken) + T(more) (each step with the running sessions' decode rows)."""
        zeros, step_ms = [0] * len(views), self.planner.step_ms
        return 2 * step_ms(views, zeros, taken + more) <= 2 * step_ms(views, zeros, taken) + step_ms(views, zeros, more)

    def _fits(self, views: list[SessionView]) -> bool:
        """Whether a plain step over these sessions fits the tightest TPOT SLO among them."""
        caps = [v.tpot_slo_ms for v in views if v.tpot_slo_ms > 0]
        return len(views) <= 1 or not caps or self.planner.step_ms(views, [0] * len(views)) <= min(caps)

    def _prompt_budget(self, views: list[SessionView]) -> int:
        """The most prompt tokens a step may carry while every running session with a TPOT SLO
        gets its next token by when its schedule wants it (a session ahead of schedule lends its
        slack; one behind leaves none)."""
        limit = self.config.max_prefill_tokens
        slack = [-v.behind_ms for v in views if v.tpot_slo_ms > 0]
        if not slack:
            return limit
        cap, zeros = min(slack) * SCHEDULE_HEADROOM, [0] * len(views)
        lo, hi = 0, limit  # the largest budget whose predicted step fits `cap` (step time grows with it)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.planner.step_ms(views, zeros, mid) <= cap:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _ttft_need(self, seq: Sequence, views: list[SessionView], remaining: int) -> int:
        """The fewest prompt tokens this step must carry for the request to make its TTFT, reading
        the same chunk in every step from now on beside the running sessions' decode rows: 0 while
        it can wait (also where it can be read whole once the running sessions have their last
        tokens), the whole rest for a session the verifier lost (its stream is stalled) or one too
        late for anything less. Spreading a late prompt over the steps left, rather than reading it
        whole at the last moment, holds the running sessions back by the least per token."""
        if seq.status is Status.RUNNING:
            return remaining
        if seq.ttft_deadline is None or remaining <= 0:
            return 0
        left_ms, zeros = (seq.ttft_deadline - time.monotonic()) * 1000, [0] * len(views)

        def reading_ms(steps: int) -> float:
            return steps * self.planner.step_ms(views, zeros, -(-remaining // steps))

        if reading_ms(remaining) <= left_ms or self._drain_ms() + self.planner.step_ms([], [], remaining) <= left_ms:
            return 0
        lo, hi = 1, remaining  # the most steps that still read it in time (fewer steps take longer chunks)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if reading_ms(mid) <= left_ms:
                lo = mid
            else:
                hi = mid - 1
        return -(-remaining // lo)

    def _drain_ms(self) -> float:
        """Predicted time until every running session has its last token, decoding plainly (each
        leaves the batch at its max_new_tokens; an end of sequence only comes sooner)."""
        ends = sorted(self.running.values(), key=lambda s: s.params.max_new_tokens - len(s.generated))
        ms, done = 0.0, 0
        for i, seq in enumerate(ends):
            alive = [view_of(s) for s in ends[i:]]
            left = seq.params.max_new_tokens - len(seq.generated)  # ascending: never below `done`
            ms += (left - done) * self.planner.step_ms(alive, [0] * len(alive))
            done = left
        return ms

    def _commit_prefill(self, chunks: list[tuple[Sequence, int]], items: list[PrefillItem], out: VerifyOutput) -> None:
        now = time.monotonic()
        for (seq, n), item, result in zip(chunks, items, out.prefills):
            if seq.status is Status.FINISHED:
                self._to_release.append(seq.id)  # ended while the step ran: the verifier holds it now
                continue
            if result.status is SessionStatus.INVALID:
                field, _, message = result.error.partition(": ")
                self._finish(seq, Finish.ERROR, InvalidArgument(field, message))
                continue
            if result.status is SessionStatus.EXHAUSTED:  # no KV room for it now; the others ran
                self._finish(seq, Finish.ERROR, ResourceExhausted(result.error, retry_after_ms=NO_ROOM_RETRY_MS))
                continue
            if not item.append and result.cached_tokens < seq.expect_cached:
                self.prefixes.forget()  # the verifier restarted or evicted: its cache is not what was priced
            for queue in (self.prefilling, self.resync, self.waiting):
                if seq in queue:
                    queue.remove(seq)
            seq.prefilled += n
            if seq.status is Status.WAITING:  # a re-prefill after the verifier lost it is not the prompt's
                seq.cached_tokens = result.cached_tokens
            if item.partial:
                self.prefilling.append(seq)
                continue
            if seq.status is Status.WAITING:
                seq.first_token_at = now
            seq.status = Status.RUNNING
            self.running[seq.id] = seq
            self._commit(seq, [result.token_id], now)

    # --- one speculative step ----------------------------------------------------------------
    async def _step(self, chunks: list[tuple[Sequence, int]]) -> None:
        """The step in its phases: plan, draft (in rounds), prune, verify with the prompt chunks,
        commit, record. The chunks stay queued until the step commits them, so a step that fails
        loses nothing."""
        step = _Step(list(self.running.values()))
        items = [PrefillItem(s.id, s.tokens[s.prefilled : s.prefilled + n], s.params,
                             partial=s.prefilled + n < len(s.tokens), append=s.prefilled > 0) for s, n in chunks]
        step.prompt_tokens = sum(n - (0 if s.prefilled else s.expect_cached) for s, n in chunks)
        self.planner.prompt_tokens = step.prompt_tokens
        if step.seqs:
            plans = self._plan(step)
            await self._draft(step, plans)
            self._prune(step)
            if not chunks:
                self._burst(step)
        else:
            step.predicted_ms = self.planner.step_ms([], [])
        out = await self._verify(step, items, [s for s, _ in chunks])
        if out is not None:
            # Only a session's first chunk takes KV from the cache; each result reports the
            # session's cached tokens so far.
            read = sum(len(i.prompt) - (0 if i.append else r.cached_tokens) for i, r in zip(items, out.prefills))
            if read != step.prompt_tokens:  # the cache held more or less than expected: price what was read
                step.prompt_tokens = read
                step.predicted_ms = self.planner.step_ms(step.views, [len(i.drafts) for i in step.items], read,
                                                         free=step.free)
            self._commit_step(step, out)
            self._commit_prefill(chunks, items, out)
            self._record(step, out)

    def _plan(self, step: "_Step") -> dict[str, DraftPlan]:
        tick = time.perf_counter()
        plans = self.planner.plan(step.views)
        step.explored = self.planner.exploring
        step.asked = self.drafter_available and any(p.max_draft_tokens > 0 for p in plans.values())
        for s in step.seqs:
            if s.id in self.planner.reasons:
                s.plain_reason = self.planner.reasons[s.id]
            elif not self.drafter_available:
                s.plain_reason = "drafter unavailable" if self.drafter is not None else "no drafter configured"
        step.planner_s += time.perf_counter() - tick
        return plans

    async def _draft(self, step: "_Step", plans: dict[str, DraftPlan]) -> None:
        """Propose rounds while the planner asks for them; a drafter that fails or misses its
        deadline leaves the step to plain decoding."""
        round_ = 0
        while self.drafter_available and any(p.max_draft_tokens > 0 for p in plans.values()):
            items = [ProposeItem(s.id, s.drafter_position, [] if round_ else s.tokens[s.drafter_position :],
                                 plan.max_draft_tokens, s.params, plan.stop_confidence, plan.min_token_confidence,
                                 extend=round_ > 0, free_only=plan.free_only,
                                 max_model_draft_tokens=plan.max_model_draft_tokens)
                     for s in step.seqs if (plan := plans.get(s.id)) is not None and plan.max_draft_tokens > 0]
            if not round_:
                reading = [v for v in step.views if (plan := plans.get(v.key)) is not None
                           and plan.max_draft_tokens > 0 and not plan.free_only]
                step.catchup = self.planner.catchup_tokens(reading)
            try:
                out = await self.drafter.propose(items, timeout=self._draft_timeout(step.seqs, items, step.catchup))
                self.drafter_misses = 0
            except SpecServeError as exc:
                await self._drafter_missed(exc)
                for s in step.seqs:
                    s.plain_reason = f"drafter missed its deadline or failed ({exc})"
                return
            step.draft_ns += out.draft_ns
            step.draft_steps += out.draft_steps
            for d in out.drafts:
                seq = self.running[d.session_id]
                if d.status is SessionStatus.NOT_FOUND:
                    seq.drafter_position = seq.model_unread = 0  # the drafter lost it: send everything next time
                    continue
                seq.drafter_position, seq.model_unread = seq.position, d.model_unread
                step.drafted[d.session_id].add(d.tokens, d.confidences, d.free, d.recalled)
                step.dists[d.session_id] += d.distributions
            round_ += 1
            tick = time.perf_counter()
            plans = self.planner.extend(step.views, step.drafted, round_)
            step.planner_s += time.perf_counter() - tick

    def _prune(self, step: "_Step") -> None:
        tick = time.perf_counter()
        step.keep = self.planner.prune(step.views, step.drafted)
        step.explored = self.planner.exploring  # a probe of free drafts is decided here
        # Drafts that cost no model (a suffix lookup) are priced as such, or the step-time
        # correction would learn the gap between a model's drafting and a lookup.
        step.free = all(step.drafted[s.id].free for s in step.seqs if step.keep[s.id])
        step.predicted_ms = self.planner.step_ms(step.views, [step.keep[s.id] for s in step.seqs], free=step.free)
        step.items = [VerifyItem(s.id, s.position, step.drafted[s.id].tokens[: step.keep[s.id]],
                                 step.dists[s.id][: step.keep[s.id]] if not s.params.greedy else [])
                      for s in step.seqs]
        step.planner_s += time.perf_counter() - tick

    def _burst(self, step: "_Step") -> None:
        """Plain decoding with nobody waiting: several tokens per session in one verify call
        (vLLM's multi-step scheduling), so the step's cost outside the forward (the RPCs, this
        loop, telemetry) is paid once per burst instead of once per token."""
        config = self.config
        if any(item.drafts for item in step.items):
            self.unfruitful = 0
            return
        if config.max_plain_steps < 2 or self.waiting or self.prefilling or self.resync:
            return
        # Up to the first session's last token: the burst's tokens go back when its call ends.
        cap = config.max_plain_steps
        if step.asked:
            self.unfruitful += 1
            cap = min(cap, LOOKOUT_STEPS << min(self.unfruitful - 1, 8))
        n = min(cap, int(config.max_burst_ms // max(step.predicted_ms, 1e-3)),
                *(seq.params.max_new_tokens - len(seq.generated) for seq in step.seqs))
        if n >= 2:
            for item in step.items:
                item.plain_steps = n

    async def _verify(self, step: "_Step", prefills: list[PrefillItem], prefilling: list[Sequence]
                      ) -> VerifyOutput | None:
        seqs = [*step.seqs, *prefilling]
        self.bursting = any(item.plain_steps > 1 for item in step.items)
        try:
            return await self.verifier.verify(step.items, prefills, timeout=self._timeout(seqs))
        except SpecServeError as exc:
            log.error("verifier failed: %s", exc)
            for seq in seqs:
                self._finish(seq, Finish.ERROR, _as_unavailable(exc, "verifier"))
            return None
        finally:
            self.bursting = False

    def _commit_step(self, step: "_Step", out: VerifyOutput) -> None:
        """Stream each session's emitted tokens; sessions the verifier lost go to re-prefill."""
        now = time.monotonic()
        longest = max((len(i.drafts) for i in step.items), default=0)
        step.position_accepted, step.position_drafted = [0] * longest, [0] * longest
        step.position_reached = [0] * longest
        step.free_position_reached, step.free_position_accepted = [0] * longest, [0] * longest
        for seq, item, result in zip(step.seqs, step.items, out.results):
            if result.status is SessionStatus.NOT_FOUND:
                del self.running[seq.id]
                seq.prefilled = 0
                self.resync.append(seq)
                step.accepted.append(0)
                continue
            k = len(item.drafts)
            seq.steps += max(len(result.tokens) - result.accepted, 1)  # a decode burst ran several
            seq.draft_tokens += k
            seq.accepted_tokens += result.accepted
            step.accepted.append(result.accepted)
            drafted = step.drafted[seq.id]
            free = int(drafted.free)
            if k:
                seq.hazard.observe(self.planner.survival(drafted)[:k], result.accepted)
            for j, c in enumerate(drafted.cumulative()[:k]):
                step.confidences.append(c)
                step.outcomes.append(int(j < result.accepted))
                step.free_slots.append(free + int(drafted.recalled))
                step.position_drafted[j] += 1
                step.position_accepted[j] += int(j < result.accepted)
                step.position_reached[j] += int(j <= result.accepted)
                step.free_position_accepted[j] += free * int(j < result.accepted)
                step.free_position_reached[j] += free * int(j <= result.accepted)
            self._commit(seq, result.tokens, now)

    def _record(self, step: "_Step", out: VerifyOutput) -> None:
        step_ms = (time.perf_counter() - step.started) * 1000
        probe_ms = self.planner.probe_ms(step.views, step.free, step.catchup, step_ms / out.forwards) \
            if step.explored else 0.0
        self.planner.observe_step(step.predicted_ms, step_ms / out.forwards, probe_ms, out.forwards,
                                  prompt=step.prompt_tokens > 0, drafted=any(item.drafts for item in step.items))
        self.step_id += 1
        self.on_step(StepRecord(
            step_id=self.step_id, batch_size=len(step.seqs), verified_positions=out.verified_positions,
            draft_steps=step.draft_steps, drafted=[len(i.drafts) for i in step.items], accepted=step.accepted,
            position_accepted=step.position_accepted, position_drafted=step.position_drafted,
            position_reached=step.position_reached, free_slots=step.free_slots,
            free_position_reached=step.free_position_reached, free_position_accepted=step.free_position_accepted,
            confidences=step.confidences, outcomes=step.outcomes, predicted_step_ms=step.predicted_ms,
            draft_ms=step.draft_ns / 1e6, verify_ms=out.forward_ns / 1e6, step_ms=step_ms,
            planner_ms=step.planner_s * 1000, queue_depth=len(self.waiting), running=len(self.running),
            context_tokens=sum(v.context for v in step.views), strategy_version=self.planner.strategy.version,
            mode=self.planner.strategy.mode,
            pruned=sum(len(d.tokens) for d in step.drafted.values()) - sum(step.keep.values()),
            draft_catchup_tokens=step.catchup, prompt_tokens=step.prompt_tokens,
            draft_free=self.planner.draft_free, explored=step.explored, probe_ms=probe_ms, forwards=out.forwards))

    # --- output ------------------------------------------------------------------------------
    def _commit(self, seq: Sequence, tokens: list[int], now: float) -> None:
        stream = self.streams[seq.id]
        taken, finish = [], None
        for t in tokens:
            taken.append(t)
            finish = stream.push(t)
            if finish:
                break
        seq.generated += taken
        seq.last_token_at = now
        if finish:
            self._finish(seq, finish, final_tokens=taken)
        else:
            seq.out.put_nowait(Delta(taken, stream.take_text(final=False)))

    def _finish(self, seq: Sequence, finish: Finish, error: Exception | None = None,
                final_tokens: list[int] | None = None) -> None:
        if seq.status is Status.FINISHED:
            return
        self.ended += 1
        if seq.status is Status.RUNNING or seq.prefilled:
            self._to_release.append(seq.id)
            self.prefixes.finish(seq.id, seq.tokens)  # the verifier keeps its KV as cache
        seq.status, seq.finish = Status.FINISHED, finish
        self.running.pop(seq.id, None)
        for queue in (self.waiting, self.resync, self.prefilling):
            if seq in queue:
                queue.remove(seq)
        stream = self.streams.pop(seq.id, None)
        text = stream.take_text(final=True) if stream else ""
        seq.out.put_nowait(Delta(final_tokens or [], text, finish, error))
        self.on_finish(seq)

    def _release(self) -> None:
        """Frees the sessions that ended on both model services in the background: saving their
        KV as prefix cache takes each service a few milliseconds, which the next step, and a
        request arriving meanwhile, need not wait for (each service runs its calls in turn)."""
        if self._to_release:
            ids, self._to_release = self._to_release, []
            self.releases.spawn(self._send_release(ids), "release")

    async def _send_release(self, ids: list[str]) -> None:
        backends = [self.verifier] + ([self.drafter] if self.drafter else [])
        results = await asyncio.gather(*(b.release(ids, timeout=5.0) for b in backends), return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                log.warning("release of %d sessions failed: %s", len(ids), r)


def _as_unavailable(exc: Exception, service: str) -> Exception:
    if isinstance(exc, (Unavailable, DeadlineExceeded)):
        return Unavailable(f"{service} unavailable: {exc}")
    return exc
