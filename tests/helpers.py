"""Test helpers: run requests through an in-process scheduler and collect their output."""

from __future__ import annotations

import asyncio

import torch

from gateway.local import local_scheduler
from gateway.sequence import Sequence
from specserve.sampling import SamplingParams
from specserve.strategy import Strategy


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


def run_local(models, requests: list[tuple[list[int], SamplingParams]], strategy: Strategy | None = None,
              proposer: str = "draft_model", max_batch_size: int = 16, overrides=None):
    """Run requests concurrently through one in-process scheduler; returns the finished sequences
    and their (tokens, text, finish)."""
    from gateway.scheduler import SchedulerConfig

    target, draft, tokenizer = models

    async def main():
        sch = local_scheduler(target, draft, tokenizer, [tokenizer.eos_token_id], 1024,
                              SchedulerConfig(max_batch_size=max_batch_size), strategy, proposer)
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
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=eos)
    return out[0, len(prompt):].tolist()
