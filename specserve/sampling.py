"""The processed distribution sampling parameters define, and per-session random streams (torch)."""

from __future__ import annotations

import torch

from specserve.contracts import SamplingParams


def make_generator(seed: int | None, salt: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-session random stream; `salt` keeps the drafter's and the verifier's streams apart."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed((seed * 1_000_003 + salt) % 2**63)
    return gen


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [m, V] -> probs: [m, V], float32, after temperature, top-k and top-p.

    Greedy maps each row to a one-hot on its argmax, so greedy is the temperature -> 0 limit.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
        drop_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
