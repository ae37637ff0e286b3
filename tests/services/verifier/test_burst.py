"""A decode burst: several plain steps in one verify call, the same tokens as one call per step."""

import asyncio

import pytest

from gateway.scheduler import LOOKOUT_STEPS, SchedulerConfig
from gateway.sequence import Finish, Sequence
from services.verifier.worker import VerifierWorker
from specserve.contracts import PrefillItem, SamplingParams, VerifyItem
from specserve.errors import InvalidArgument
from specserve.strategy import Strategy
from tests.helpers import collect

PROMPTS = [[5, 9, 11, 40, 2], [7, 3, 3, 8]]


def _stepwise(pair, prompts, n, params):
    worker = VerifierWorker(pair.runtimes()[0])
    out = worker.prefill([PrefillItem(f"s{i}", p, params) for i, p in enumerate(prompts)])
    tokens = [[r.token_id] for r in out.results]
    for _ in range(n):
        step = worker.verify([VerifyItem(f"s{i}", len(p) + len(t), []) for i, (p, t) in enumerate(zip(prompts, tokens))])
        for t, r in zip(tokens, step.results):
            t += r.tokens
    return tokens


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, seed=3)], ids=["greedy", "sampled"])
def test_a_burst_commits_what_one_step_per_call_would(tiny_pair, params):
    expected = _stepwise(tiny_pair, PROMPTS, 6, params)
    worker = VerifierWorker(tiny_pair.runtimes()[0])
    out = worker.prefill([PrefillItem(f"s{i}", p, params) for i, p in enumerate(PROMPTS)])
    tokens = [[r.token_id] for r in out.results]
    burst = worker.verify([VerifyItem("s0", len(PROMPTS[0]) + 1, [], plain_steps=6),
                           VerifyItem("s1", len(PROMPTS[1]) + 1, [], plain_steps=2)])
    # The first session done ends the burst: s1's last token goes back at once.
    assert burst.forwards == 2 and burst.verified_positions == 2 + 2
    assert [t + r.tokens for t, r in zip(tokens, burst.results)] == [expected[0][:3], expected[1][:3]]
    # The sessions go on from where the burst left them.
    more = worker.verify([VerifyItem("s0", len(PROMPTS[0]) + 3, [], plain_steps=4)])
    assert expected[0][:3] + more.results[0].tokens == expected[0][:7] and more.forwards == 4


def test_a_burst_ends_at_an_end_of_sequence_token(tiny_pair):
    expected = _stepwise(tiny_pair, PROMPTS[:1], 6, SamplingParams())[0]
    worker = VerifierWorker(tiny_pair.runtimes()[0], eos_token_ids=(expected[3],))
    worker.prefill([PrefillItem("s0", PROMPTS[0], SamplingParams())])
    out = worker.verify([VerifyItem("s0", len(PROMPTS[0]) + 1, [], plain_steps=6)])
    stop = expected.index(expected[3], 1)  # the first time the stop token comes after the first token
    assert out.results[0].tokens == expected[1 : stop + 1] and out.forwards == stop


@pytest.mark.parametrize("item", [VerifyItem("s0", 6, [], plain_steps=-1), VerifyItem("s0", 6, [], plain_steps=65),
                                  VerifyItem("s0", 6, [3], plain_steps=2)])
def test_a_bad_burst_is_refused_naming_the_field(tiny_models, item):
    worker = VerifierWorker(tiny_models.runtimes()[0])
    worker.prefill([PrefillItem("s0", PROMPTS[0], SamplingParams())])
    with pytest.raises(InvalidArgument) as err:
        worker.verify([item])
    assert err.value.field == "plain_steps"
    assert len(worker.sessions.get("s0").tokens) == len(PROMPTS[0]) + 1  # the session is unchanged


def test_plain_decoding_bursts_only_while_nobody_waits_and_stays_lossless(tiny_pair):
    """`off` with one request: verify calls carry bursts (fewer calls than tokens), the output is
    target-only decoding's; a second request arriving mid-stream goes in with the next call."""
    sch = tiny_pair.scheduler(SchedulerConfig(max_plain_steps=4, max_burst_ms=1e9), Strategy(mode="off"), eos_ids=[])
    calls, verify = [], sch.verifier.verify

    async def recording(items, prefills=(), timeout=None):
        calls.append({"items": [*items], "prefills": [*prefills]})
        return await verify(items, prefills, timeout)

    sch.verifier.verify = recording
    first, second = (Sequence(f"r{i}", p, SamplingParams(max_new_tokens=24)) for i, p in enumerate(PROMPTS))

    async def main():
        sch.start()
        sch.submit(first)
        out = asyncio.ensure_future(collect(first))
        await asyncio.wait_for(_until(lambda: len(first.generated) >= 5), 30)
        sch.submit(second)
        outs = [await out, await collect(second)]
        await sch.stop()
        return outs

    outs = asyncio.run(main())
    for seq, (tokens, _, _) in zip((first, second), outs):
        assert tokens == tiny_pair.reference(seq.prompt, 24)[0]
    bursts = [c for c in calls if any(it.plain_steps > 1 for it in c["items"])]
    assert bursts and len(calls) < 2 * 24
    # No call that carried the second request's prompt was a burst.
    assert all(not c["prefills"] or all(it.plain_steps <= 1 for it in c["items"]) for c in calls)


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0)


def test_an_end_asked_for_before_the_burst_call_starts_still_ends_it(tiny_pair):
    """The gateway asks to end a burst as soon as a request arrives, which may be before the
    verifier has started the call: the burst still ends after its first forward, and the next
    call bursts in full."""
    worker = VerifierWorker(tiny_pair.runtimes()[0])
    worker.prefill([PrefillItem("s0", PROMPTS[0], SamplingParams())])
    worker.end_burst.set()
    out = worker.verify([VerifyItem("s0", len(PROMPTS[0]) + 1, [], plain_steps=6)])
    assert out.forwards == 1
    out = worker.verify([VerifyItem("s0", len(PROMPTS[0]) + 2, [], plain_steps=4)])
    assert out.forwards == 4


def test_a_request_arriving_during_a_burst_ends_it_after_the_current_forward(tiny_pair):
    """A long burst (20 steps allowed) is under way when a second request arrives: the burst ends
    early and the prompt goes in with the next call, long before the burst's 20 steps; both outputs
    are target-only decoding's."""
    sch = tiny_pair.scheduler(SchedulerConfig(max_plain_steps=20, max_burst_ms=1e9), Strategy(mode="off"), eos_ids=[],
                              verify_delay_ms=0)
    calls, verify = [], sch.verifier.verify
    first, second = (Sequence(f"r{i}", p, SamplingParams(max_new_tokens=40)) for i, p in enumerate(PROMPTS))
    forward = sch.verifier.worker.runtime.forward
    forwards_seen, loops = [], []

    def counting(rows):  # on the compute thread
        forwards_seen.append(len(rows))
        if len(forwards_seen) == 4:  # the first burst is under way: the second request arrives
            loops[0].call_soon_threadsafe(sch.submit, second)
            # This forward ends once the gateway has asked the burst to end (however busy the
            # machine), so the next forward is the first the burst would not have run.
            assert sch.verifier.worker.end_burst.wait(60)
        return forward(rows)

    async def recording(items, prefills=(), timeout=None):
        calls.append({"items": [*items], "prefills": [*prefills]})
        return await verify(items, prefills, timeout)

    sch.verifier.verify = recording

    async def main():
        loops.append(asyncio.get_running_loop())
        sch.start()
        sch.submit(first)
        sch.verifier.worker.runtime.forward = counting
        outs = await asyncio.gather(collect(first), asyncio.wait_for(_until(lambda: second.id in sch.streams), 60))
        outs = [outs[0], await collect(second)]
        await sch.stop()
        return outs

    outs = asyncio.run(main())
    for seq, (tokens, _, _) in zip((first, second), outs):
        assert tokens == tiny_pair.reference(seq.prompt, 40)[0]
    first_burst = next(i for i, c in enumerate(calls) if any(it.plain_steps > 1 for it in c["items"]))
    joined = next(i for i, c in enumerate(calls) if any(p.session_id == second.id for p in c["prefills"]))
    assert joined == first_burst + 1  # the prompt went in with the call right after the burst ended
    assert forwards_seen.index(2) == 4  # ... with the forward right after the one under way


def test_a_request_cancelled_during_a_burst_ends_it_after_the_current_forward(tiny_pair):
    """The client of the only running request goes away while a long burst (20 steps allowed) is
    under way: the burst ends after its current forward and the request finishes as cancelled."""
    sch = tiny_pair.scheduler(SchedulerConfig(max_plain_steps=20, max_burst_ms=1e9), Strategy(mode="off"), eos_ids=[])
    seq = Sequence("r0", PROMPTS[0], SamplingParams(max_new_tokens=40))
    forward = sch.verifier.worker.runtime.forward
    forwards_seen, loops, asked = [], [], []

    def counting(rows):  # on the compute thread
        forwards_seen.append(len(rows))
        if len(forwards_seen) == 4:  # the first burst is under way: the client goes away
            loops[0].call_soon_threadsafe(sch.cancel, seq)
            asked.append(sch.verifier.worker.end_burst.wait(10))  # this forward ends once the gateway asked
        return forward(rows)

    async def main():
        loops.append(asyncio.get_running_loop())
        sch.start()
        sch.submit(seq)
        sch.verifier.worker.runtime.forward = counting
        out = await collect(seq)
        await sch.stop()
        return out

    tokens, _, finish = asyncio.run(main())
    assert asked == [True] and finish is Finish.CANCELLED and len(forwards_seen) == 4
    assert tokens == tiny_pair.reference(seq.prompt, 40)[0][: len(tokens)]


def test_a_burst_stops_at_the_first_sessions_last_token(tiny_pair):
    """Two sessions decode plainly, one with 3 tokens to go: no burst runs past its last token, so
    its client has it without waiting for the other's forwards; outputs stay target-only."""
    sch = tiny_pair.scheduler(SchedulerConfig(max_plain_steps=8, max_burst_ms=1e9), Strategy(mode="off"), eos_ids=[])
    calls, verify = [], sch.verifier.verify

    async def recording(items, prefills=(), timeout=None):
        calls.append({s.id: (len(s.generated), it.plain_steps) for it in items
                      for s in (short, long_) if s.id == it.session_id})
        return await verify(items, prefills, timeout)

    sch.verifier.verify = recording
    short, long_ = Sequence("short", PROMPTS[0], SamplingParams(max_new_tokens=4)), \
        Sequence("long", PROMPTS[1], SamplingParams(max_new_tokens=20))

    async def main():
        sch.start()
        for seq in (short, long_):
            sch.submit(seq)
        outs = [await collect(short), await collect(long_)]
        await sch.stop()
        return outs

    outs = asyncio.run(main())
    for seq, (tokens, _, _) in zip((short, long_), outs):
        assert tokens == tiny_pair.reference(seq.prompt, seq.params.max_new_tokens)[0]
    with_short = [c for c in calls if "short" in c]
    assert with_short and all(generated + steps <= 4 for generated, steps in (c["short"] for c in with_short))
    assert all(c["long"][1] == c["short"][1] for c in with_short if "long" in c)  # the whole burst stops there


def test_a_step_that_asked_for_drafts_and_got_none_bursts_a_few_forwards_only(tiny_pair):
    """A step whose sessions asked the drafter for drafts (static k, the suffix proposer) and got
    none bursts at most LOOKOUT_STEPS forwards, since the next step may find a copied run, and
    twice as many after each such step in a row; `off`, which asks for none, bursts up to
    `max_plain_steps`. Both stay lossless."""
    longest, undrafted = {}, {}
    for mode in ("static", "off"):
        sch = tiny_pair.scheduler(SchedulerConfig(max_plain_steps=16, max_burst_ms=1e9),
                                  Strategy(mode=mode, static_k=3), eos_ids=[], proposer="suffix")
        calls, verify = [], sch.verifier.verify

        async def recording(items, prefills=(), timeout=None, verify=verify, calls=calls):
            calls.append([*items])
            return await verify(items, prefills, timeout)

        sch.verifier.verify = recording
        seq = Sequence("r0", PROMPTS[0], SamplingParams(max_new_tokens=40))

        async def main(sch=sch, seq=seq):
            sch.start()
            sch.submit(seq)
            out = await collect(seq)
            await sch.stop()
            return out

        assert asyncio.run(main())[0] == tiny_pair.reference(seq.prompt, 40)[0]
        longest[mode] = max(it.plain_steps for items in calls for it in items)
        undrafted[mode] = sum(1 for items in calls for it in items if not it.drafts)
        if mode == "static":
            in_row = 0  # undrafted calls in a row
            for items in filter(None, calls):  # not the prompt's call
                if any(it.drafts for it in items):
                    in_row = 0
                    continue
                assert max(it.plain_steps for it in items) <= LOOKOUT_STEPS << in_row
                in_row += 1
    assert undrafted["static"] > 1 and LOOKOUT_STEPS < longest["off"]
