"""The engine core end to end in one process: greedy speculative output equals target-only output,
for every controller and batch mix; rollback leaves the target cache exact."""

import asyncio
import random

import pytest
import torch

from gateway.sequence import Finish, Sequence
from services.verifier.worker import VerifierWorker
from specserve.contracts import PrefillItem, SamplingParams, VerifyItem
from specserve.runtime import Row
from specserve.strategy import Strategy
from tests.helpers import assert_lossless, collect, run_local, target_only


def _requests(seed: int, vocab: int, n: int = 6):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 60))]
        out.append((prompt, SamplingParams(max_new_tokens=rng.randrange(1, 40))))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("strategy", [
    Strategy(mode="static", static_k=3), Strategy(mode="threshold"), Strategy(mode="adaptive"),
    Strategy(mode="specserve", gate_margin=0.0), Strategy(mode="smartspec", acceptance_rate=0.9, smartspec_margin=0.1),
])
def test_greedy_speculation_equals_target_only(tiny_pair, seed, strategy):
    tokenizer = tiny_pair.tokenizer
    requests = _requests(seed, len(tokenizer))
    # Mixed budgets in one batch, including 0 (plain decode) for some sessions.
    seqs, outs = run_local(tiny_pair, requests, strategy, overrides=[("", 0), ("static", 0), ("static", 5)])
    for (prompt, params), (tokens, _, _) in zip(requests, outs):
        assert_lossless(tokens, tiny_pair.reference(prompt, params.max_new_tokens, tokenizer.eos_token_id))
    assert sum(s.draft_tokens for s in seqs) > 0


def test_torch_runtime_equals_hugging_face_generate(tiny_models):
    """The torch runtime's plain greedy decoding is Hugging Face's own."""
    for prompt in ([5], [9, 3, 200, 17, 4, 4, 4], list(range(3, 60))):
        tokens, _ = tiny_models.reference(prompt, 25)
        assert tokens == target_only(tiny_models.target, prompt, 25)


def test_cheap_speculation_is_used_and_accepted(tiny_pair):
    """With drafting priced as cheap, the adaptive controller drafts and drafts get accepted."""
    from specserve.strategy import CostModel

    strategy = Strategy(mode="adaptive", cost=CostModel(draft_fixed=1.0, draft_per_seq=0.1))
    seqs, _ = run_local(tiny_pair, _requests(7, len(tiny_pair.tokenizer)), strategy)
    assert sum(s.accepted_tokens for s in seqs) > 0


def test_ngram_proposer_is_lossless(tiny_pair):
    tokenizer = tiny_pair.tokenizer
    prompt = tokenizer.encode("for i in range(10):\n    print(i)\nfor i in range(10):\n")
    seqs, outs = run_local(tiny_pair, [(prompt, SamplingParams(max_new_tokens=30))],
                           Strategy(mode="static", static_k=4), proposer="ngram")
    assert_lossless(outs[0][0], tiny_pair.reference(prompt, 30, tokenizer.eos_token_id))


def test_stop_conditions_cut_at_the_same_token(tiny_models):
    tokenizer = tiny_models.tokenizer
    prompt = tokenizer.encode("def add(a, b):")
    reference = target_only(tiny_models.target, prompt, 30, tokenizer.eos_token_id)
    text = tokenizer.decode(reference, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2] or "x"
    params = SamplingParams(max_new_tokens=30, stop=(stop,))
    runs = [run_local(tiny_models, [(prompt, params)], Strategy(mode=m, static_k=4))[1][0] for m in ("off", "static")]
    assert runs[0] == runs[1]
    tokens, out_text, finish = runs[0]
    if stop in text:
        assert finish is Finish.STOP and stop not in out_text and text.startswith(out_text)


def test_eos_finishes_the_request(tiny_models):
    eos = tiny_models.tokenizer.eos_token_id
    prompt = [5, 6, 7]
    reference = target_only(tiny_models.target, prompt, 20)
    seqs, outs = run_local(tiny_models, [(prompt, SamplingParams(max_new_tokens=20))], Strategy(mode="static", static_k=3))
    tokens, _, finish = outs[0]
    if eos in reference:
        assert tokens == reference[: reference.index(eos) + 1] and finish is Finish.EOS
    else:
        assert tokens == reference and finish is Finish.LENGTH


def test_ignore_eos_decodes_past_the_end_of_sequence(tiny_models):
    """A token the target emits is made end-of-sequence: it finishes a request there unless the
    request ignores EOS, which then decodes the whole reference (speculating, batched together)."""
    prompt = [5, 6, 7]
    reference = target_only(tiny_models.target, prompt, 20)
    eos = reference[5]
    cut = reference[: reference.index(eos) + 1]

    async def main():
        sch = tiny_models.scheduler(strategy=Strategy(mode="static", static_k=3), eos_ids=[eos])
        sch.start()
        seqs = [Sequence(f"r{i}", prompt, SamplingParams(max_new_tokens=20), ignore_eos=bool(i)) for i in range(2)]
        for seq in seqs:
            sch.submit(seq)
        outs = await asyncio.gather(*(collect(s) for s in seqs))
        await sch.stop()
        return outs

    stopped, ignoring = asyncio.run(main())
    assert stopped[0] == cut and stopped[2] is Finish.EOS and len(cut) < 20
    assert ignoring[0] == reference and ignoring[2] is Finish.LENGTH


@torch.inference_mode()
def test_rollback_matches_fresh_prefill(tiny_pair):
    """After a step with rejected drafts, the next step's target logits equal those of a fresh
    prefill of the committed prefix, on the same runtime."""
    runtime, _ = tiny_pair.runtimes()
    worker = VerifierWorker(runtime)
    prompt = [5, 9, 11, 40, 2]
    first = worker.prefill([PrefillItem("s", prompt, SamplingParams())]).results[0].token_id
    bad = [(first + 1) % 300 + 3, 7, 8, 9]  # almost surely rejected at once
    result = worker.verify([VerifyItem("s", len(prompt) + 1, bad)]).results[0]
    assert result.accepted < len(bad)
    committed = worker.sessions.get("s").tokens
    assert runtime.length("s") == len(committed) - 1
    cached = runtime.forward([Row("s", [committed[-1]], [0])])[0][0]
    fresh_runtime, _ = tiny_pair.runtimes()
    fresh = fresh_runtime.forward([Row("f", committed, [len(committed) - 1])])[0][0]
    assert torch.allclose(fresh, cached, atol=1e-4)


def test_llama_cpp_runtime_refuses_sessions_past_its_limit_and_leaks_none(tiny_models):
    from specserve.errors import ResourceExhausted
    from specserve.runtime.llama_runtime import LlamaCppRuntime

    runtime = LlamaCppRuntime(tiny_models.gguf[0], 256, max_sessions=2, kv_tokens=512, threads=1)
    runtime.forward([Row("a", [5, 6], [1]), Row("b", [7], [0])])
    with pytest.raises(ResourceExhausted):
        runtime.forward([Row("c", [8], [0])])
    assert set(runtime.seq_ids) == {"a", "b"}
    runtime.release("a")
    assert runtime.forward([Row("c", [8], [0])])[0].shape == (1, runtime.vocab_size)


def test_a_prompt_that_fills_the_context_is_refused_and_one_short_of_it_gets_its_token(tiny_pair):
    """Through validation and the fused step on both runtimes, prefix cache on: a prompt of the whole
    context window is refused naming the field; one token shorter is served its one token, the
    target's own; and a second request sharing most of that prompt reuses it and stays exact."""
    import asyncio

    from gateway.request import GenerateInput, Limits, validate
    from specserve.errors import InvalidArgument
    from tests.helpers import collect

    max_context = 96
    limits = Limits(max_context)
    vocab = len(tiny_pair.tokenizer)
    full = [(7 * i) % 300 + 3 for i in range(max_context)]
    with pytest.raises(InvalidArgument, match="^prompt"):
        validate(GenerateInput(prompt_token_ids=full, max_new_tokens=4), tiny_pair.tokenizer, vocab, limits)
    short = validate(GenerateInput(prompt_token_ids=full[:-1], max_new_tokens=4), tiny_pair.tokenizer, vocab, limits)
    assert short.params.max_new_tokens == 1
    shared = validate(GenerateInput(prompt_token_ids=full[:80] + [5, 6, 7], max_new_tokens=8), tiny_pair.tokenizer,
                      vocab, limits)
    sch = tiny_pair.scheduler(strategy=Strategy(mode="static", static_k=3), eos_ids=[10**6], max_context=max_context)

    async def main():
        sch.start()
        outs = []
        for seq in (short, shared):  # one after the other: the second finds the first's KV cached
            sch.submit(seq)
            outs.append(await collect(seq))
        await sch.stop()
        return outs

    (first, _, _), (second, _, _) = asyncio.run(main())
    assert_lossless(first, tiny_pair.reference(short.prompt, 1))
    assert_lossless(second, tiny_pair.reference(shared.prompt, 8))
    assert shared.cached_tokens >= 80 - 1
