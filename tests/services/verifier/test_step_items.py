"""One bad item fails alone: in a fused step, a malformed prompt chunk is refused (INVALID) and a
chunk the KV has no room for is refused (EXHAUSTED), while the running sessions' step runs."""

import asyncio

from gateway.backends.local import local_scheduler
from gateway.sequence import Sequence
from services.verifier.worker import VerifierWorker
from specserve.contracts import PrefillItem, SamplingParams, SessionStatus, VerifyItem
from specserve.errors import InvalidArgument, ResourceExhausted
from specserve.strategy import Strategy
from tests.helpers import collect

PROMPT = [5, 9, 11, 40, 2]


def test_a_malformed_prompt_chunk_is_refused_alone(tiny_pair):
    worker = VerifierWorker(tiny_pair.runtimes(max_context=64)[0])
    worker.prefill([PrefillItem("running", PROMPT, SamplingParams())])
    out = worker.verify([VerifyItem("running", len(PROMPT) + 1, [])],
                        [PrefillItem("long", list(range(3, 80)), SamplingParams()),
                         PrefillItem("bad", [10**6], SamplingParams()),
                         PrefillItem("good", PROMPT, SamplingParams())])
    long, bad, good = out.prefills
    assert long.status is SessionStatus.INVALID and long.error.startswith("prompt_token_ids:")
    assert bad.status is SessionStatus.INVALID and "outside" in bad.error
    assert good.status is SessionStatus.OK and good.token_id >= 0
    assert out.results[0].status is SessionStatus.OK and len(out.results[0].tokens) == 1
    assert worker.sessions.get("long") is None and worker.sessions.get("bad") is None


def test_a_prompt_without_kv_room_is_exhausted_and_the_running_step_goes_on(tiny_models):
    from specserve.runtime.llama_runtime import LlamaCppRuntime

    runtime = LlamaCppRuntime(tiny_models.gguf[0], 256, max_sessions=4, kv_tokens=256, threads=1)
    worker = VerifierWorker(runtime)
    held = [(3 * i) % 200 + 7 for i in range(40)]
    worker.prefill([PrefillItem("running", held, SamplingParams())])
    out = worker.verify([VerifyItem("running", len(held) + 1, [])],
                        [PrefillItem("big", [(5 * i) % 200 + 9 for i in range(230)], SamplingParams())])
    assert out.prefills[0].status is SessionStatus.EXHAUSTED
    assert out.results[0].status is SessionStatus.OK and len(out.results[0].tokens) == 1
    assert runtime.length("big") == 0
    # The Prefill RPC alone keeps its contract: the call fails with the reason.
    try:
        worker.prefill([PrefillItem("big", [(5 * i) % 200 + 9 for i in range(230)], SamplingParams())])
    except ResourceExhausted as exc:
        assert exc.retry_after_ms > 0
    else:
        raise AssertionError("a prompt without KV room was prefilled")


def test_the_scheduler_ends_only_the_request_that_did_not_fit(tiny_models):
    from specserve.runtime.llama_runtime import LlamaCppRuntime

    target = LlamaCppRuntime(tiny_models.gguf[0], 256, max_sessions=4, kv_tokens=256, threads=1)
    tokenizer = tiny_models.tokenizer
    sch = local_scheduler(target, None, tokenizer, [10**6], strategy=Strategy(mode="off"))
    running = Sequence("running", [(3 * i) % 200 + 7 for i in range(40)], SamplingParams(max_new_tokens=30))
    big = Sequence("big", [(5 * i) % 200 + 9 for i in range(230)], SamplingParams(max_new_tokens=4))

    async def main():
        sch.start()
        sch.submit(running)
        out = asyncio.ensure_future(collect(running))
        while not running.generated:
            await asyncio.sleep(0)
        sch.submit(big)
        results = await asyncio.gather(out, collect(big), return_exceptions=True)
        await sch.stop()
        return results

    (tokens, _, _), refused = asyncio.run(main())
    assert len(tokens) == 30
    assert isinstance(refused, ResourceExhausted) and refused.retry_after_ms > 0
    assert not isinstance(refused, InvalidArgument)
