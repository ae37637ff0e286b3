"""Test helpers: the tiny pair on either runtime, in-process schedulers, and reference outputs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import torch

from gateway.backends.local import local_scheduler
from gateway.scheduler import Scheduler, SchedulerConfig
from gateway.sequence import Sequence
from specserve.contracts import SamplingParams
from specserve.runtime import Row, Runtime
from specserve.strategy import Strategy

# A divergence between speculative and plain greedy output is a bug unless the target's two best
# logits at that position are this close (kernels that differ by batch shape may swap them).
NEAR_TIE = 0.05
# llama.cpp's quantized matmuls take another path for a batch of several positions than for one: on
# the built-in Q4_K_M target the top-2 logit gap moved by up to 0.43 between a 1-position and a
# 5-position forward over the same tokens (2-core AVX-512 Xeon, HumanEval prompts). A verify step of
# k+1 positions may therefore pick the other of two tokens that close, as any batched server does.
QUANTIZED_NEAR_TIE = 0.5


@dataclass
class TinyPair:
    """The tiny target and draft, served by `runtime` ("torch" or "llama.cpp")."""

    runtime: str
    target: torch.nn.Module  # the Hugging Face models (the torch runtime wraps them)
    draft: torch.nn.Module
    tokenizer: object
    gguf: tuple[Path, Path] | None = None  # the same weights as GGUF files (the llama.cpp runtime)

    def runtimes(self, max_context: int = 1024) -> tuple[Runtime, Runtime]:
        """Fresh runtimes (no sessions) for target and draft."""
        if self.runtime == "torch":
            from specserve.runtime.torch_runtime import TorchRuntime

            return TorchRuntime(self.target, max_context=max_context), TorchRuntime(self.draft, max_context=max_context)
        from specserve.runtime.llama_runtime import LlamaCppRuntime

        return tuple(LlamaCppRuntime(p, max_context, max_sessions=64, kv_tokens=16384, threads=1) for p in self.gguf)

    def scheduler(self, config: SchedulerConfig | None = None, strategy: Strategy | None = None,
                  eos_ids: list[int] | None = None, max_context: int = 1024, **kw) -> Scheduler:
        target, draft = self.runtimes(max_context)
        eos = [self.tokenizer.eos_token_id] if eos_ids is None else eos_ids
        return local_scheduler(target, draft, self.tokenizer, eos, config, strategy, **kw)

    def reference(self, prompt: list[int], n: int, eos: int | list[int] | None = None) -> tuple[list[int], list[float]]:
        """Target-only greedy decoding on this pair's runtime, one token per forward, stopping after
        an `eos` id, and the gap between the two best target logits at each generated position."""
        stop = set([eos] if isinstance(eos, int) else eos or [])
        return greedy_reference(self.runtimes()[0], prompt, n, stop)


def greedy_reference(runtime: Runtime, prompt: list[int], n: int, stop: set[int] = frozenset()
                     ) -> tuple[list[int], list[float]]:
    """Plain greedy decoding on `runtime`, one token per forward, stopping after a `stop` id, with
    the gap between the two best logits at each generated position."""
    tokens, gaps = [], []
    feed = prompt
    while len(tokens) < n:
        logits = runtime.forward([Row("ref", feed, [len(feed) - 1])])[0][0]
        top = torch.topk(logits, 2).values
        gaps.append(float(top[0] - top[1]))
        feed = [int(logits.argmax())]
        tokens.append(feed[0])
        if feed[0] in stop:
            break
    return tokens, gaps


def assert_lossless(tokens: list[int], reference: tuple[list[int], list[float]], near_tie: float = NEAR_TIE) -> None:
    """Speculative tokens equal plain greedy tokens, or they part where the target's top two
    logits are within `near_tie` of each other."""
    expected, gaps = reference
    if tokens == expected:
        return
    at = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), min(len(tokens), len(expected)))
    gap = gaps[at] if at < len(gaps) else float("inf")
    assert gap <= near_tie, f"output diverges from target-only at token {at} where the top-2 logit gap is {gap:.4f}"


async def collect(seq: Sequence) -> tuple[list[int], str, object]:
    tokens, text = [], ""
    while True:
        delta = await seq.out.get()
        if delta.error is not None:
            raise delta.error
        tokens += delta.token_ids
        text += delta.text
        if delta.finish:
            return tokens, text, delta.finish


def run_local(pair: TinyPair, requests: list[tuple[list[int], SamplingParams]], strategy: Strategy | None = None,
              proposer: str = "draft_model", max_batch_size: int = 16, overrides=None, on_step=None,
              max_plain_steps: int = SchedulerConfig.max_plain_steps):
    """Run requests concurrently through one in-process scheduler; returns the finished sequences
    and their (tokens, text, finish)."""

    async def main():
        hooks = {"on_step": on_step} if on_step else {}
        config = SchedulerConfig(max_batch_size=max_batch_size, max_plain_steps=max_plain_steps)
        sch = pair.scheduler(config, strategy, proposer=proposer, **hooks)
        sch.start()
        seqs = [Sequence(f"r{i}", p, params) for i, (p, params) in enumerate(requests)]
        for i, s in enumerate(seqs):
            if overrides:
                s.mode, s.static_k = overrides[i % len(overrides)]
            sch.submit(s)
        outs = await asyncio.gather(*(collect(s) for s in seqs))
        await sch.stop()
        return seqs, outs

    return asyncio.run(main())


@torch.inference_mode()
def target_only(model, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """Plain greedy decoding with Hugging Face generate: the reference output."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=eos)
    return out[0, len(prompt):].tolist()
