"""The step loop's behaviour under faults and costs, in one process with the tiny pair."""

import asyncio

import pytest

from gateway.backends.local import LocalVerifier
from gateway.scheduler import SchedulerConfig
from gateway.sequence import Sequence, Slo, Status
from specserve.contracts import SamplingParams
from specserve.errors import DeadlineExceeded, Unavailable
from specserve.strategy import CostModel, Strategy
from tests.helpers import collect, target_only

PROMPT = [5, 9, 11, 40, 2]


def _run(scheduler, seqs):
    async def main():
        scheduler.start()
        for s in seqs:
            scheduler.submit(s)
        outs = await asyncio.gather(*(collect(s) for s in seqs), return_exceptions=True)
        await scheduler.stop()
        return outs

    return asyncio.run(main())


def test_a_drafter_that_sleeps_turns_steps_into_plain_decoding(tiny_models):
    """Draft calls get a deadline from the cost model; a drafter that misses it leaves those steps
    to plain decoding and, after repeated misses, is left alone: output stays exact."""
    quick = CostModel(draft_fixed=2.0, draft_per_seq=0.5, verify_fixed=5.0, verify_per_pos=0.1)
    sch = tiny_models.scheduler(SchedulerConfig(draft_timeout_floor_s=0.2, drafter_retry_s=30.0),
                                Strategy(mode="static", static_k=3, cost=quick), draft_delay_ms=2000)
    seq = Sequence("s", PROMPT, SamplingParams(max_new_tokens=12))
    (tokens, _, _), = _run(sch, [seq])
    assert tokens == target_only(tiny_models.target, PROMPT, 12, tiny_models.tokenizer.eos_token_id)
    assert seq.draft_tokens == 0 and "drafter" in seq.plain_reason
    assert sch.drafter_misses >= 1


def test_a_step_that_always_fails_fails_its_requests(tiny_models):
    class Broken(LocalVerifier):
        async def verify(self, items, prefills=(), timeout=None):
            raise RuntimeError("kernel exploded")

    sch = tiny_models.scheduler(strategy=Strategy(mode="off"))
    sch.verifier = Broken(sch.verifier.worker, sch.verifier._info)
    seq = Sequence("s", PROMPT, SamplingParams(max_new_tokens=5))
    (out,) = _run(sch, [seq])
    assert isinstance(out, Unavailable) and "failed 3 times" in str(out)


@pytest.mark.parametrize("table, prunes", [
    (((1, 50.0), (6, 52.0), (7, 400.0), (14, 420.0)), True),  # verifying past 6 positions costs 8x
    (((1, 50.0), (14, 50.0)), False),  # flat: every drafted slot is worth verifying
])
def test_adaptive_prunes_slots_where_a_shape_step_pays_and_only_there(tiny_models, table, prunes):
    records = []
    cost = CostModel(draft_fixed=0.0, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=table,
                     shape_buckets=(6, 14) if prunes else ())
    sch = tiny_models.scheduler(strategy=Strategy(mode="adaptive", cost=cost, mean_confidence=0.9, max_draft_tokens=6),
                                on_step=records.append)
    seqs = [Sequence(f"s{i}", [*PROMPT, i + 3], SamplingParams(max_new_tokens=10)) for i in range(2)]
    outs = _run(sch, seqs)
    for seq, (tokens, _, _) in zip(seqs, outs):
        assert tokens == target_only(tiny_models.target, seq.prompt, 10, tiny_models.tokenizer.eos_token_id)
    drafted = sum(sum(r.drafted) + r.pruned for r in records)
    assert drafted > 0
    assert (sum(r.pruned for r in records) > 0) == prunes


def _recording_drafter(sch, sent: list) -> None:
    """Record (draft budget, tokens sent) of each item of every Propose the scheduler makes."""
    propose = sch.drafter.propose

    async def recording(items, timeout=None):
        sent.append([(i.max_draft_tokens, len(i.new_tokens)) for i in items])
        return await propose(items, timeout)

    sch.drafter.propose = recording


def test_the_drafter_reads_a_prompt_at_its_first_draft_round_never_alongside_the_verifier(tiny_models):
    sent = []
    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=64), Strategy(mode="static", static_k=3))
    _recording_drafter(sch, sent)
    busy = []
    verify = sch.verifier.verify

    async def verifying(items, prefills=(), timeout=None):
        busy.append(sch.verifier.compute)  # the drafter never runs while this call is in flight
        try:
            return await verify(items, prefills, timeout)
        finally:
            busy.pop()

    propose = sch.drafter.propose

    async def proposing(items, timeout=None):
        assert not busy
        return await propose(items, timeout)

    sch.verifier.verify, sch.drafter.propose = verifying, proposing
    prompt = [(7 * i) % 300 + 3 for i in range(300)]
    seq = Sequence("long", prompt, SamplingParams(max_new_tokens=8))
    (tokens, _, _), = _run(sch, [seq])
    assert tokens == target_only(tiny_models.target, prompt, 8, tiny_models.tokenizer.eos_token_id)
    assert all(k > 0 for call in sent for k, _ in call)  # no prompt-only call
    first, *later = [n for call in sent for _, n in call]
    assert first == len(prompt) + 1  # the prompt and the first token, at the first draft round
    assert later and max(later) <= 3 + 1  # then only what the last step committed


def test_with_speculation_off_the_drafter_is_left_alone(tiny_models):
    sent = []
    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=64), Strategy(mode="off"))
    _recording_drafter(sch, sent)
    prompt = [(7 * i) % 300 + 3 for i in range(100)]
    off = Sequence("off", prompt, SamplingParams(max_new_tokens=6))
    (tokens, _, _), = _run(sch, [off])
    assert tokens == target_only(tiny_models.target, prompt, 6, tiny_models.tokenizer.eos_token_id)
    assert sent == []
    # A request with a mode of its own speculates: the drafter reads its prompt at the first round.
    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=64), Strategy(mode="off"))
    _recording_drafter(sch, sent)
    own = Sequence("own", prompt, SamplingParams(max_new_tokens=6))
    own.mode, own.static_k = "static", 2
    (tokens, _, _), = _run(sch, [own])
    assert tokens == target_only(tiny_models.target, prompt, 6, tiny_models.tokenizer.eos_token_id)
    assert sent[0] == [(2, len(prompt) + 1)]


def test_a_cost_model_that_decodes_plainly_never_calls_the_drafter(tiny_models):
    # Drafting costs far more than it saves here, so adaptive decodes plainly from its first step.
    costly = CostModel(draft_fixed=500.0, draft_per_seq=500.0)
    sent = []
    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=64), Strategy(mode="adaptive", cost=costly))
    _recording_drafter(sch, sent)
    seqs = [Sequence("first", PROMPT, SamplingParams(max_new_tokens=4)),
            Sequence("later", PROMPT * 3, SamplingParams(max_new_tokens=4))]
    for seq, (tokens, _, _) in zip(seqs, _run(sch, seqs)):
        assert tokens == target_only(tiny_models.target, seq.prompt, 4, tiny_models.tokenizer.eos_token_id)
    assert sent == []


def _recording_verifier(sch, calls: list) -> None:
    """Record (verify rows, prompt tokens) of every Verify the scheduler makes."""
    verify = sch.verifier.verify

    async def recording(items, prefills=(), timeout=None):
        calls.append((len(items), sum(len(p.prompt) for p in prefills)))
        return await verify(items, prefills, timeout)

    sch.verifier.verify = recording


def test_prompts_join_the_running_batch_in_the_same_forward(tiny_models):
    """One verifier call per step: a prompt arriving while another session decodes is prefilled in
    the decode step's own call, and both outputs stay exact."""
    calls, records = [], []
    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=16), Strategy(mode="static", static_k=2),
                                on_step=records.append)
    _recording_verifier(sch, calls)
    first = Sequence("first", PROMPT, SamplingParams(max_new_tokens=24))
    second = Sequence("second", [(3 * i) % 200 + 7 for i in range(40)], SamplingParams(max_new_tokens=6))

    async def main():
        sch.start()
        sch.submit(first)
        out = asyncio.ensure_future(collect(first))
        while not first.generated:  # wait until it decodes, then send the second prompt
            await asyncio.sleep(0)
        sch.submit(second)
        outs = [await out, await collect(second)]
        await sch.stop()
        return outs

    for seq, (tokens, _, _) in zip((first, second), asyncio.run(main())):
        assert tokens == target_only(tiny_models.target, seq.prompt, len(tokens), tiny_models.tokenizer.eos_token_id)
    fused = [c for c in calls if c[0] > 0 and c[1] > 0]
    assert len(fused) >= 3  # 40 prompt tokens in chunks of 16, each beside the first's decode rows
    assert len(calls) == len(records)  # one verifier call per step
    assert all(r.prompt_tokens <= 16 for r in records)


# Each prompt token costs 10 ms over a 50 ms plain step (the table is linear past 2 positions).
LINEAR = CostModel(draft_fixed=0.0, draft_per_seq=0.0, verify_per_ctx=0.0,
                   verify_table=((1, 50.0), (2, 60.0), (512, 5170.0)))


def _on_schedule(seq: Sequence, tokens: int = 1) -> None:
    """A running session whose next token is due one TPOT from now."""
    import time

    seq.status, seq.generated = Status.RUNNING, list(range(tokens))
    seq.first_token_at = time.monotonic() - (tokens - 1) * seq.slo.tpot_ms / 1000


def test_the_token_budget_keeps_a_running_session_on_its_tpot_schedule(tiny_models):
    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=512), Strategy(mode="off", cost=LINEAR))
    running = Sequence("running", PROMPT, SamplingParams(max_new_tokens=40), Slo(tpot_ms=110))
    _on_schedule(running)
    sch.running[running.id] = running
    long = Sequence("long", list(range(3, 123)), SamplingParams(max_new_tokens=2))
    sch.waiting.append(long)
    (seq, n), = sch._select_prefill()
    assert seq is long
    # 50 ms + 10 ms per token within 90% of 110 ms: 4 prompt tokens beside the decode row (5
    # positions: 90 ms; 5 tokens would take 100 ms).
    assert n == 4 and long.held_back  # its TTFT must not teach admission the wait as cost
    # Behind schedule, the step carries no prompt at all (the request has no TTFT to protect).
    running.first_token_at -= 0.5
    assert sch._select_prefill() == []


@pytest.mark.parametrize("ttft_ms, chunk", [
    (20_000, 0),  # a token per step beside the decode row (60 ms) still reads it in time: it waits
    (3_000, 4),  # 33 steps of 4 tokens (90 ms each) make it; 40 steps of 3 (80 ms each) would not
    (1_300, 120),  # only one step with the whole prompt (1,250 ms) makes it
    (1, 120),  # too late for anything: the whole prompt now
])
def test_a_prompt_the_budget_would_make_late_takes_the_smallest_chunk_that_makes_its_ttft(tiny_models, ttft_ms,
                                                                                          chunk):
    import time

    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=512), Strategy(mode="off", cost=LINEAR))
    running = Sequence("running", PROMPT, SamplingParams(max_new_tokens=40), Slo(tpot_ms=100))
    _on_schedule(running)
    running.first_token_at -= 0.5  # behind schedule: the budget is 0
    sch.running[running.id] = running
    long = Sequence("long", list(range(3, 123)), SamplingParams(max_new_tokens=2), Slo(ttft_ms=ttft_ms))
    long.arrival = time.monotonic()
    sch.waiting.append(long)
    assert sch._select_prefill() == ([(long, chunk)] if chunk else [])


def test_a_prompt_that_can_be_read_whole_after_the_running_sessions_end_waits_for_them(tiny_models):
    """A running session with 3 tokens to go (50 ms each) ends before a 120-token prompt (1,240 ms
    alone) must start for its 1,500 ms TTFT: the prompt adds nothing to the session's steps, where,
    read beside it from now on, it would need 24 tokens a step."""
    import time

    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=512), Strategy(mode="off", cost=LINEAR))
    running = Sequence("running", PROMPT, SamplingParams(max_new_tokens=4), Slo(tpot_ms=100))
    _on_schedule(running)
    running.first_token_at -= 0.5  # behind schedule: the budget is 0
    sch.running[running.id] = running
    long = Sequence("long", list(range(3, 123)), SamplingParams(max_new_tokens=2), Slo(ttft_ms=1_500))
    long.arrival = time.monotonic()
    sch.waiting.append(long)
    assert sch._select_prefill() == []
    running.params = SamplingParams(max_new_tokens=40)  # a long answer: the prompt goes beside it
    assert sch._select_prefill() == [(long, 24)]


def test_the_batch_grows_only_while_its_plain_step_fits_the_tightest_tpot(tiny_models):
    # A plain step costs 50 ms per session here (the table is linear in positions).
    per_session = CostModel(draft_fixed=0.0, draft_per_seq=0.0, verify_per_ctx=0.0,
                            verify_table=((1, 50.0), (2, 100.0), (3, 150.0), (4, 200.0)))
    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=512), Strategy(mode="off", cost=per_session))
    running = Sequence("running", PROMPT, SamplingParams(max_new_tokens=40), Slo(tpot_ms=120))
    _on_schedule(running, tokens=20)
    running.first_token_at += 10  # far ahead of schedule: plenty of slack for prompt tokens
    sch.running[running.id] = running
    fits = Sequence("a", [1, 2, 3], SamplingParams(max_new_tokens=2))
    too_many = Sequence("b", [4, 5, 6], SamplingParams(max_new_tokens=2))
    sch.waiting += [fits, too_many]
    # Two sessions step in 100 ms <= 120; a third would take 150 ms.
    assert [s for s, _ in sch._select_prefill()] == [fits]
    running.slo = Slo(tpot_ms=90)
    assert sch._select_prefill() == []


@pytest.mark.parametrize("table, together", [
    (LINEAR.verify_table, False),  # compute-bound: each prompt token costs 10 ms
    (((1, 50.0), (512, 52.0)), True),  # an under-used accelerator: prompt tokens ride nearly free
])
def test_queued_prompts_share_a_forward_only_where_that_brings_first_tokens_sooner(tiny_models, table, together):
    cost = CostModel(draft_fixed=0.0, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=table)
    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=512), Strategy(mode="off", cost=cost))
    later = Sequence("later", list(range(3, 63)), SamplingParams(max_new_tokens=2), Slo(ttft_ms=20_000))
    sooner = Sequence("sooner", list(range(3, 43)), SamplingParams(max_new_tokens=2), Slo(ttft_ms=10_000))
    sch.waiting += [later, sooner]
    chosen = sch._select_prefill()
    assert chosen == ([(sooner, 40), (later, 60)] if together else [(sooner, 40)])
    assert not later.held_back  # it waits its turn, as admission predicts


def test_cached_prompts_cost_what_the_verifier_reads(tiny_models):
    """A prompt whose prefix a finished session left in the verifier's cache is priced as its
    uncached tail: two such prompts share a forward where, uncached, the compute-bound table
    reads them one after another (above); the chunk still carries the whole prompt."""
    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=512), Strategy(mode="off", cost=LINEAR))
    sch.prefixes.finish("earlier", list(range(3, 63)) + [7, 7])
    later = Sequence("later", list(range(3, 63)), SamplingParams(max_new_tokens=2), Slo(ttft_ms=20_000))
    sooner = Sequence("sooner", list(range(3, 43)), SamplingParams(max_new_tokens=2), Slo(ttft_ms=10_000))
    sch.waiting += [later, sooner]
    assert sch._select_prefill() == [(sooner, 40), (later, 60)]
    assert (sooner.expect_cached, later.expect_cached) == (39, 59)
    assert sch.unread(later) == 1
    fresh = Sequence("fresh", list(range(100, 160)), SamplingParams(max_new_tokens=2))
    assert sch.unread(fresh) == 60


def test_a_prefix_the_verifier_no_longer_holds_is_forgotten(tiny_models):
    """The gateway remembers a finished session the verifier does not hold (it restarted): the first
    prompt priced on it finds no cached prefix, and nothing finished is assumed cached after that."""
    records = []
    sch = tiny_models.scheduler(strategy=Strategy(mode="off", cost=LINEAR), on_step=records.append)
    prompt = list(range(3, 43))
    sch.prefixes.finish("before-restart", prompt + [7, 7])
    sch.prefixes.finish("older", list(range(100, 140)))
    seq = Sequence("again", prompt, SamplingParams(max_new_tokens=3))
    _run(sch, [seq])
    assert (seq.expect_cached, seq.cached_tokens) == (39, 0)
    assert [r.prompt_tokens for r in records if r.prompt_tokens] == [40]  # priced as read
    assert list(sch.prefixes.finished) == ["again"]
    assert sch.unread(Sequence("other", list(range(100, 140)), SamplingParams())) == 40


def test_a_step_is_priced_by_the_prompt_tokens_the_verifier_read(tiny_models):
    """The step record and the step-time correction use the prompt tokens the verifier computed:
    a repeated prompt, found in the running session's KV, reads one token, as the gateway expected."""
    records = []
    sch = tiny_models.scheduler(strategy=Strategy(mode="off", cost=LINEAR), on_step=records.append)
    prompt = list(range(3, 43))
    first = Sequence("first", prompt, SamplingParams(max_new_tokens=3))
    again = Sequence("again", prompt, SamplingParams(max_new_tokens=3))
    _run(sch, [first, again])  # read one after another: the second from the first's running KV
    reads = [r.prompt_tokens for r in records if r.prompt_tokens]
    assert reads == [40, 1]
    assert again.cached_tokens == 39 and again.expect_cached == 39


def test_chunks_after_a_cached_prefix_are_priced_by_their_own_tokens(tiny_models):
    """A prompt whose prefix is cached, read in chunks: the verifier reports the session's cached
    tokens with every chunk, and each step is priced by the tokens its chunk computed."""
    records = []
    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=8), Strategy(mode="off", cost=LINEAR),
                                on_step=records.append)
    prompt = list(range(3, 43))
    first = Sequence("first", prompt, SamplingParams(max_new_tokens=3))
    longer = Sequence("longer", prompt + list(range(50, 70)), SamplingParams(max_new_tokens=3))
    _run(sch, [first, longer])
    reads = [r.prompt_tokens for r in records if r.prompt_tokens]
    assert longer.cached_tokens >= 39 and min(reads) > 0
    assert sum(reads) == len(prompt) + 60 - longer.cached_tokens


def test_a_session_exactly_on_schedule_is_not_late():
    import time

    seq = Sequence("s", PROMPT, SamplingParams(), Slo(tpot_ms=100))
    seq.first_token_at = time.monotonic()
    seq.generated = [1]
    assert seq.behind_ms <= 0  # the next token is due one TPOT after the first
    seq.first_token_at -= 0.25  # 250 ms since the first token, still one token out
    assert seq.behind_ms == pytest.approx(150, abs=20)


def test_the_drafter_probe_drafts_for_real_before_speculation_resumes(tiny_models):
    """A drafter that answers Info but hangs in Propose stays left alone; once it drafts again,
    the probe sees it and speculation resumes."""
    sch = tiny_models.scheduler(SchedulerConfig(draft_timeout_floor_s=0.05, drafter_retry_s=0.05, drafter_max_misses=1),
                                Strategy(mode="static", static_k=2))
    propose = sch.drafter.propose
    state = {"stuck": True, "probes": 0}

    async def flaky(items, timeout=None):
        if items[0].session_id == "drafter-probe":
            state["probes"] += 1
        if state["stuck"]:  # the injected fault: a drafter stuck in its draft loop, past the call's deadline
            try:
                await asyncio.wait_for(asyncio.sleep(5), timeout)
            except TimeoutError:
                raise DeadlineExceeded("drafter did not answer in time") from None
        return await propose(items, timeout)

    sch.drafter.propose = flaky
    seq = Sequence("s", PROMPT, SamplingParams(max_new_tokens=400))

    async def until(condition, limit_s=30.0):
        deadline = asyncio.get_running_loop().time() + limit_s
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
            await asyncio.sleep(0.01)

    async def main():
        sch.start()
        sch.submit(seq)
        out = asyncio.ensure_future(collect(seq))
        await until(lambda: state["probes"] >= 3)
        assert not sch.drafter_available  # Info would have answered all along
        state["stuck"] = False
        await until(lambda: sch.drafter_available)
        drafted = seq.draft_tokens
        await until(lambda: seq.draft_tokens > drafted or seq.finish is not None)
        seq.cancelled = True
        await out
        await sch.stop()

    asyncio.run(main())
    assert seq.draft_tokens > 0


def test_a_probe_step_records_the_extra_time_the_exploration_budget_charges(tiny_models):
    """The gate stays closed (drafts at 37.5 ms each against 75 ms steps, confidence 0.3), the budget
    allows probes: their steps carry their predicted extra time, plain steps none."""
    records = []
    dear = CostModel(draft_fixed=37.5, draft_per_seq=0.0, verify_per_ctx=0.0,
                     verify_table=((1, 75.0), (2, 120.0), (4, 150.0), (8, 200.0)))
    sch = tiny_models.scheduler(strategy=Strategy(mode="adaptive", cost=dear, mean_confidence=0.3),
                                on_step=records.append)
    sch.planner.decode_ms = 1e6  # a long history of plain decoding: a budget for several probes
    seq = Sequence("s", PROMPT, SamplingParams(max_new_tokens=12))

    async def main():
        sch.start()
        sch.submit(seq)
        tokens = await collect(seq)
        await sch.stop()
        return tokens

    asyncio.run(main())
    probes = [r for r in records if r.explored]
    assert probes and all(r.probe_ms > 0 for r in probes)
    assert all(r.probe_ms == 0 for r in records if not r.explored) and len(probes) < len(records)


def test_the_next_request_does_not_wait_for_the_release_of_sessions_that_ended(tiny_models):
    """Freeing an ended session (its KV saved as prefix cache on each service) goes on in the
    background: a request that follows gets its answer while that release is still under way,
    and stopping the scheduler waits for it."""
    sch = tiny_models.scheduler(strategy=Strategy(mode="static", static_k=2))
    released: list[str] = []

    async def main():
        gate = asyncio.Event()
        for backend in (sch.verifier, sch.drafter):
            release = backend.release

            async def held(ids, timeout=None, owner="", release=release):
                await gate.wait()
                released.extend(ids)
                return await release(ids, timeout, owner)

            backend.release = held
        sch.start()
        first, second = (Sequence(name, [*PROMPT, i], SamplingParams(max_new_tokens=4)) for i, name in enumerate("ab"))
        sch.submit(first)
        await collect(first)
        sch.submit(second)
        tokens, _, _ = await asyncio.wait_for(collect(second), timeout=60)
        assert released == []  # the first session's release is still held
        gate.set()
        await sch.stop()
        return tokens

    tokens = asyncio.run(main())
    assert tokens == target_only(tiny_models.target, [*PROMPT, 1], 4, tiny_models.tokenizer.eos_token_id)
    assert sorted(released) == ["a", "a", "b", "b"]


@pytest.mark.parametrize("linger_ms", [0.0, 1000.0])
def test_after_a_request_ends_the_next_step_waits_for_a_new_one_to_join_it(tiny_models, linger_ms):
    """A closed-loop client's next request goes into the step after its last answer, beside the
    running session, when the scheduler lingers for it; without lingering that step runs on."""
    sch = tiny_models.scheduler(SchedulerConfig(linger_ms=linger_ms), Strategy(mode="off"))
    calls = []  # per verifier call: the sessions it decodes and those whose prompts it reads
    verify = sch.verifier.verify

    async def recording(items, prefills=(), timeout=None):
        calls.append(({i.session_id for i in items}, {p.session_id for p in prefills}))
        return await verify(items, prefills, timeout)

    sch.verifier.verify = recording
    short, long_, follow = (Sequence(name, [*PROMPT, i], SamplingParams(max_new_tokens=n), ignore_eos=True)
                            for i, (name, n) in enumerate((("short", 2), ("long", 40), ("follow", 2))))

    async def main():
        sch.start()
        sch.submit(short)
        sch.submit(long_)
        await collect(short)
        sch.submit(follow)  # as the client that got its answer sends the next request
        await collect(follow)
        await collect(long_)
        await sch.stop()

    asyncio.run(main())
    last = max(i for i, (decoded, _) in enumerate(calls) if "short" in decoded)
    assert "long" in calls[last + 1][0]
    assert ("follow" in calls[last + 1][1]) == (linger_ms > 0)


def test_after_a_step_ends_two_requests_the_next_one_waits_for_two_new_ones(tiny_models):
    """A step that ended two requests lingers until both clients' next requests are in (a
    speculative step often ends several at once); the one that came first does not start it alone."""
    sch = tiny_models.scheduler(SchedulerConfig(linger_ms=1000.0), Strategy(mode="off"))
    calls = []  # per verifier call: the sessions whose prompts it reads
    verify = sch.verifier.verify

    async def recording(items, prefills=(), timeout=None):
        calls.append({p.session_id for p in prefills})
        return await verify(items, prefills, timeout)

    sch.verifier.verify = recording
    a, b, long_, next_a, next_b = (Sequence(name, [*PROMPT, i], SamplingParams(max_new_tokens=n), ignore_eos=True)
                                   for i, (name, n) in enumerate((("a", 2), ("b", 2), ("long", 40), ("next-a", 2),
                                                                  ("next-b", 2))))

    async def main():
        sch.start()
        for seq in (a, b, long_):
            sch.submit(seq)
        await asyncio.gather(collect(a), collect(b))
        sch.submit(next_a)
        for _ in range(5):  # the scheduler runs in between, as it would while the second client sends
            await asyncio.sleep(0)
        sch.submit(next_b)
        await asyncio.gather(collect(next_a), collect(next_b), collect(long_))
        await sch.stop()

    asyncio.run(main())
    assert {"next-a", "next-b"} in calls
