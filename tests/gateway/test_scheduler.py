"""The step loop's behaviour under faults and costs, in one process with the tiny pair."""

import asyncio

import pytest

from gateway.backends.local import LocalVerifier
from gateway.scheduler import SchedulerConfig
from gateway.sequence import Sequence, Slo
from specserve.contracts import SamplingParams
from specserve.errors import Unavailable
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
        async def verify(self, items, timeout=None):
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


def test_the_drafter_reads_prompts_in_the_prefill_chunks_never_in_a_decode_step(tiny_models):
    sent = []
    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=64), Strategy(mode="static", static_k=3))
    _recording_drafter(sch, sent)
    prompt = [(7 * i) % 300 + 3 for i in range(300)]
    seq = Sequence("long", prompt, SamplingParams(max_new_tokens=8))
    (tokens, _, _), = _run(sch, [seq])
    assert tokens == target_only(tiny_models.target, prompt, 8, tiny_models.tokenizer.eos_token_id)
    prefill = [n for call in sent for k, n in call if k == 0]
    decode = [n for call in sent for k, n in call if k > 0]
    assert sum(prefill) == len(prompt) and max(prefill) <= 64
    assert decode and max(decode) <= 3 + 1  # only what the last step committed


def test_with_speculation_off_the_drafter_is_left_alone_and_catches_up_when_it_starts(tiny_models):
    sent = []
    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=64), Strategy(mode="off"))
    _recording_drafter(sch, sent)
    prompt = [(7 * i) % 300 + 3 for i in range(100)]
    off = Sequence("off", prompt, SamplingParams(max_new_tokens=6))
    (tokens, _, _), = _run(sch, [off])
    assert tokens == target_only(tiny_models.target, prompt, 6, tiny_models.tokenizer.eos_token_id)
    assert sent == []
    # A request with a mode of its own speculates, so the drafter reads its prompt alongside.
    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=64), Strategy(mode="off"))
    _recording_drafter(sch, sent)
    own = Sequence("own", prompt, SamplingParams(max_new_tokens=6))
    own.mode, own.static_k = "static", 2
    (tokens, _, _), = _run(sch, [own])
    assert tokens == target_only(tiny_models.target, prompt, 6, tiny_models.tokenizer.eos_token_id)
    assert sum(n for call in sent for k, n in call if k == 0) == len(prompt)


def test_a_cost_model_that_decodes_plainly_stops_feeding_the_drafter(tiny_models):
    # Drafting costs far more than it saves here, so adaptive decodes plainly from its first step.
    costly = CostModel(draft_fixed=500.0, draft_per_seq=500.0)
    sent = []
    sch = tiny_models.scheduler(SchedulerConfig(max_prefill_tokens=64), Strategy(mode="adaptive", cost=costly))
    _recording_drafter(sch, sent)
    first = Sequence("first", PROMPT, SamplingParams(max_new_tokens=4))
    later = Sequence("later", PROMPT * 3, SamplingParams(max_new_tokens=4))
    fed = []

    async def main():
        sch.start()
        sch.submit(first)
        outs = [await collect(first)]
        fed.append(sum(n for call in sent for _, n in call))
        sch.submit(later)
        outs.append(await collect(later))
        await sch.stop()
        return outs

    (first_tokens, _, _), (later_tokens, _, _) = asyncio.run(main())
    assert first_tokens == target_only(tiny_models.target, PROMPT, 4, tiny_models.tokenizer.eos_token_id)
    assert later_tokens == target_only(tiny_models.target, PROMPT * 3, 4, tiny_models.tokenizer.eos_token_id)
    assert fed == [len(PROMPT)]  # the first prompt, read before any step had decided
    assert sum(n for call in sent for _, n in call) == len(PROMPT) and not sch.last_step_drafted


def test_a_session_exactly_on_schedule_is_not_late():
    import time

    seq = Sequence("s", PROMPT, SamplingParams(), Slo(tpot_ms=100))
    seq.first_token_at = time.monotonic()
    seq.generated = [1]
    assert seq.behind_ms <= 0  # the next token is due one TPOT after the first
    seq.first_token_at -= 0.25  # 250 ms since the first token, still one token out
    assert seq.behind_ms == pytest.approx(150, abs=20)
