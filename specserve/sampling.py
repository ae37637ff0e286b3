"""Sampling parameters, their validation, and the processed distribution they define."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specserve.errors import InvalidArgument

MAX_NEW_TOKENS_LIMIT = 8192


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, prefix: str = "sampling", max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT) -> "SamplingParams":
        """Raise InvalidArgument naming the first bad field; return self when all are good."""
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise InvalidArgument(f"{prefix}.max_new_tokens", f"must be in [1, {max_new_tokens_limit}], got {self.max_new_tokens}")
        if not self.temperature >= 0.0 or self.temperature == float("inf"):
            raise InvalidArgument(f"{prefix}.temperature", f"must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument(f"{prefix}.top_k", f"must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument(f"{prefix}.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidArgument(f"{prefix}.seed", f"must be in [0, 2^63), got {self.seed}")
        if any(not s for s in self.stop):
            raise InvalidArgument(f"{prefix}.stop", "stop strings must not be empty")
        return self


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
