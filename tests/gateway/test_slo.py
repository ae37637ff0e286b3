"""Per-request SLOs with the tiny pair and a verifier slowed by a fixed per-call delay."""

import asyncio
import time

import pytest

from gateway.admission import Admission, attainment
from gateway.metrics import GatewayMetrics
from gateway.scheduler import SchedulerConfig, view_of
from gateway.sequence import Finish, Sequence, Slo
from specserve.contracts import SamplingParams
from specserve.errors import ResourceExhausted
from specserve.strategy import CostModel, Strategy
from tests.helpers import collect

DELAY_MS = 40
# The cost model a policy would have fitted for this slowed verifier (drafting is ~free here).
COST = CostModel(draft_fixed=2, draft_per_seq=0.5, verify_fixed=DELAY_MS + 5, verify_per_pos=0.2, verify_per_ctx=0)


def _scheduler(tiny_models, mode="off", max_batch=2, **kw):
    return tiny_models.scheduler(SchedulerConfig(max_batch_size=max_batch), Strategy(mode=mode, cost=COST),
                                 eos_ids=[10**6], verify_delay_ms=DELAY_MS, **kw)


def test_burst_beyond_capacity_is_rejected_not_violated(tiny_models):
    async def main():
        metrics = GatewayMetrics()
        sch = _scheduler(tiny_models, on_finish=metrics.observe_finish)
        admission = Admission(sch, "reject", on_reject=lambda s: metrics.rejected.labels("slo").inc(), margin=1.5)
        sch.start()
        warm = Sequence("warm", [5, 6, 7], SamplingParams(max_new_tokens=6))
        sch.submit(warm)
        await collect(warm)  # a few measured steps correct the cost model online
        admitted, rejected = [], 0
        for i in range(12):
            seq = Sequence(f"r{i}", [5, 6, 7, i + 8], SamplingParams(max_new_tokens=8), Slo(ttft_ms=600))
            try:
                admission.admit(seq)
            except ResourceExhausted as exc:
                rejected += 1
                assert exc.retry_after_ms > 0
                continue
            sch.submit(seq)
            admitted.append(seq)
        await asyncio.gather(*(collect(s) for s in admitted))
        await sch.stop()
        return admitted, rejected, metrics

    admitted, rejected, metrics = asyncio.run(main())
    assert rejected > 0 and len(admitted) >= 2
    assert all(attainment(s).ttft for s in admitted), [s.ttft_ms for s in admitted]
    # The counters agree with the per-request accounting.
    assert metrics.attained._value.get() == sum(attainment(s).slo for s in admitted) + 1
    assert metrics.attained._value.get() + metrics.violated._value.get() == len(admitted) + 1
    assert metrics.rejected.labels("slo")._value.get() == rejected


def test_best_effort_is_queued_and_marked(tiny_models):
    async def main():
        sch = _scheduler(tiny_models)
        admission = Admission(sch, "reject")
        seqs = [Sequence(f"r{i}", [5, 6, 7], SamplingParams(max_new_tokens=20), Slo(ttft_ms=1, best_effort=True))
                for i in range(3)]
        for s in seqs:
            admission.admit(s)
            sch.submit(s)
        sch.start()
        await asyncio.gather(*(collect(s) for s in seqs))
        await sch.stop()
        return seqs

    seqs = asyncio.run(main())
    assert all(s.unattainable for s in seqs) and all(len(s.generated) == 20 for s in seqs)


def test_an_idle_system_admits_whatever_its_cost_model_predicts(tiny_models):
    """A cost model a thousand times slower than the machine (a profile measured while it was busy)
    never locks admission shut: the idle system admits and serves the first request, marked
    unattainable; a request behind it is still judged by the model, and once idle again only a TTFT
    below the fastest measured one is refused."""
    slow = CostModel(draft_fixed=2, draft_per_seq=0.5, verify_fixed=100_000, verify_per_pos=100, verify_per_ctx=0)

    async def main():
        sch = tiny_models.scheduler(SchedulerConfig(max_batch_size=2), Strategy(mode="off", cost=slow),
                                    eos_ids=[10**6])
        admission = Admission(sch, "reject")
        first = Sequence("first", [5, 6, 7], SamplingParams(max_new_tokens=4), Slo(ttft_ms=500))
        admission.admit(first)
        sch.submit(first)
        second = Sequence("second", [5, 6, 8], SamplingParams(max_new_tokens=4), Slo(ttft_ms=500))
        try:
            admission.admit(second)
            refused = None
        except ResourceExhausted as exc:
            refused = exc
        sch.start()
        await collect(first)
        admission.observe(first)
        # Idle again: a TTFT SLO below the fastest TTFT measured is refused whatever the model says.
        hasty = Sequence("hasty", [5, 6, 9], SamplingParams(max_new_tokens=4), Slo(ttft_ms=first.ttft_ms / 2))
        try:
            admission.admit(hasty)
            impossible = None
        except ResourceExhausted as exc:
            impossible = exc
        await sch.stop()
        return first, refused, impossible

    first, refused, impossible = asyncio.run(main())
    assert len(first.generated) == 4 and first.unattainable
    assert refused is not None and "exceeds the SLO of 500 ms" in str(refused)
    assert impossible is not None and impossible.retry_after_ms >= 1


def test_admission_reads_queued_prompts_one_after_another_and_learns_output_lengths(tiny_models):
    """Prompts queued ahead are read before this one's (whichever forwards they share); a place
    frees after the share of max_new_tokens that finished requests generated, not all of it."""
    slo = Slo(ttft_ms=10**6)

    def seq(name, prompt_len, max_new=40):
        return Sequence(name, list(range(5, 5 + prompt_len)), SamplingParams(max_new_tokens=max_new), slo)

    def prefill(s):
        return sch.planner.step_ms([], [], len(s.tokens))

    sch = _scheduler(tiny_models, max_batch=4)
    admission = Admission(sch, "reject")
    a, b, c = seq("a", 40), seq("b", 20), seq("c", 3)
    for s in (a, b):
        admission.admit(s)
        sch.submit(s)
    assert admission.predict_ttft_ms(c) == pytest.approx(prefill(a) + prefill(b) + prefill(c))

    sch = _scheduler(tiny_models, max_batch=1)  # one place: c waits for a to finish
    admission = Admission(sch, "reject")
    admission.admit(a)
    sch.submit(a)
    step = sch.planner.step_ms([view_of(a)], [0])
    before = admission.predict_ttft_ms(c)
    assert before == pytest.approx(prefill(a) + 40 * step + prefill(c))
    for i in range(30):  # finished requests stopped after a quarter of their max_new_tokens
        done = seq(f"d{i}", 3)
        done.generated, done.finish = [7] * 10, Finish.EOS
        admission.observe(done)
    expected = admission.expected_remaining(a)
    assert 10 <= expected < 13  # 40 x the learned share (0.25 plus what is left of the prior)
    after = admission.predict_ttft_ms(c)
    assert after == pytest.approx(prefill(a) + expected * step + prefill(c)) and after < before


@pytest.mark.parametrize("held_back, ttft_ms, moves", [
    (False, 3000, "up"),  # read as soon as it could be, and late: the cost model was too fast
    (True, 3000, "none"),  # it waited for the running sessions' TPOT on purpose: nothing to learn
    (True, 500, "down"),  # even so it came sooner than predicted: the cost model was too slow
])
def test_the_ttft_correction_learns_from_a_held_back_prompt_only_that_it_was_too_slow(tiny_models, held_back,
                                                                                     ttft_ms, moves):
    admission = Admission(_scheduler(tiny_models), "reject")
    seq = Sequence("s", [5, 6, 7], SamplingParams(max_new_tokens=8), Slo(ttft_ms=10**5))
    seq.predicted_ttft_ms, seq.held_back, seq.finish = 1000.0, held_back, Finish.LENGTH
    seq.first_token_at = seq.arrival + ttft_ms / 1000
    admission.observe(seq)
    assert {"up": admission.ttft_scale > 1, "none": admission.ttft_scale == 1,
            "down": admission.ttft_scale < 1}[moves]


def test_a_request_admitted_ahead_of_queued_ones_adds_its_reading_to_their_predicted_ttft(tiny_models):
    """Deadline order lets a later arrival read its prompt first: those it passes expect to wait
    for that, so their measured TTFT does not teach the TTFT correction an error it never made."""
    sch = _scheduler(tiny_models, max_batch=4)
    admission = Admission(sch, "reject")
    chat = Sequence("chat", list(range(5, 65)), SamplingParams(max_new_tokens=8), Slo(ttft_ms=10**6))
    code = Sequence("code", list(range(5, 45)), SamplingParams(max_new_tokens=8), Slo(ttft_ms=10**5))
    admission.admit(chat)
    sch.submit(chat)
    alone = chat.predicted_ttft_ms
    admission.admit(code)
    sch.submit(code)
    assert code.predicted_ttft_ms == pytest.approx(sch.planner.step_ms([], [], 40))  # it goes first
    assert chat.predicted_ttft_ms == pytest.approx(alone + code.predicted_ttft_ms)
    late = Sequence("late", [5, 6, 7], SamplingParams(max_new_tokens=8), Slo(ttft_ms=10**7))
    admission.admit(late)  # sorts after both: it moves nobody
    assert chat.predicted_ttft_ms == pytest.approx(alone + code.predicted_ttft_ms)


def test_a_prompt_the_prefix_cache_holds_is_predicted_as_its_uncached_tail(tiny_models):
    sch = _scheduler(tiny_models)
    admission = Admission(sch, "reject")
    prompt = list(range(5, 65))
    cold = Sequence("cold", prompt, SamplingParams(max_new_tokens=8), Slo(ttft_ms=10**6))
    admission.admit(cold)
    assert cold.predicted_ttft_ms == pytest.approx(sch.planner.step_ms([], [], 60))
    sch.prefixes.finish("earlier", prompt + [3, 4])
    warm = Sequence("warm", prompt, SamplingParams(max_new_tokens=8), Slo(ttft_ms=10**6))
    admission.admit(warm)
    assert warm.predicted_ttft_ms == pytest.approx(sch.planner.step_ms([], [], 1))


def test_queue_orders_by_deadline_then_priority(tiny_models):
    async def main():
        sch = _scheduler(tiny_models, max_batch=1)
        seqs = [
            Sequence("none-low", [5, 6], SamplingParams(max_new_tokens=2), Slo(), priority=0),
            Sequence("ttft-1000", [5, 6], SamplingParams(max_new_tokens=2), Slo(ttft_ms=1000)),
            Sequence("ttft-500", [5, 6], SamplingParams(max_new_tokens=2), Slo(ttft_ms=500)),
            Sequence("none-high", [5, 6], SamplingParams(max_new_tokens=2), Slo(), priority=5),
        ]
        for s in seqs:
            sch.submit(s)
        sch.start()
        await asyncio.gather(*(collect(s) for s in seqs))
        await sch.stop()
        return sorted(seqs, key=lambda s: s.first_token_at)

    order = [s.id for s in asyncio.run(main())]
    assert order == ["ttft-500", "ttft-1000", "none-high", "none-low"]


def test_tight_tpot_caps_the_step(tiny_models):
    """Next to loose requests, a tight-TPOT request keeps every speculative step it runs in under
    its TPOT by the cost model (k shrinks, down to plain decoding)."""
    records = []

    async def main():
        sch = _scheduler(tiny_models, mode="static", max_batch=4, on_step=records.append)
        sch.planner.set_strategy(Strategy(mode="adaptive", cost=COST, mean_confidence=0.9))
        tight = Sequence("tight", [5, 6, 7], SamplingParams(max_new_tokens=12), Slo(tpot_ms=DELAY_MS + 8))
        loose = [Sequence(f"l{i}", [8, 9, i + 3], SamplingParams(max_new_tokens=12)) for i in range(3)]
        for s in [tight, *loose]:
            sch.submit(s)
        sch.start()
        await asyncio.gather(*(collect(s) for s in [tight, *loose]))
        await sch.stop()

    asyncio.run(main())
    records = [r for r in records if r.batch_size]  # the first step only read the prompts
    with_tight = records[: min(len(records), 11)]
    assert with_tight and all(r.predicted_step_ms <= DELAY_MS + 8 or max(r.drafted) == 0 for r in with_tight)
    # Without the tight request the same batch speculates more deeply.
    loose_only = records[11:]
    if loose_only:
        assert max(max(r.drafted) for r in loose_only) >= max(max(r.drafted) for r in with_tight)


def test_long_prefill_is_chunked_and_running_sessions_keep_decoding(tiny_models):
    """A 600-token prompt prefilled 64 tokens per step: the running request keeps getting decode
    steps meanwhile, and both outputs equal target-only decoding."""
    from tests.helpers import target_only

    target = tiny_models.target
    long_prompt = [(i * 7) % 300 + 3 for i in range(600)]
    records = []

    async def main():
        sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=64), Strategy(mode="static", static_k=2),
                                    eos_ids=[10**6], on_step=lambda r: records.append(time.monotonic()))
        short = Sequence("short", [5, 6, 7], SamplingParams(max_new_tokens=30))
        sch.submit(short)
        sch.start()
        await short.out.get()
        longer = Sequence("long", long_prompt, SamplingParams(max_new_tokens=5))
        sch.submit(longer)
        outs = await asyncio.gather(collect(short), collect(longer))
        await sch.stop()
        return short, longer, outs

    short, longer, outs = asyncio.run(main())
    assert longer.generated == target_only(target, long_prompt, 5)
    assert short.generated == target_only(target, [5, 6, 7], 30)
    # While the long prompt was being prefilled (10 chunks), the short one kept decoding.
    assert sum(longer.arrival < t < longer.first_token_at for t in records) >= 5
