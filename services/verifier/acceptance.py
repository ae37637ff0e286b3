"""Lossless acceptance rules: which drafts survive, and the token the target emits after them."""

from __future__ import annotations

import torch


def verify_greedy(draft: torch.Tensor, target: torch.Tensor) -> tuple[int, list[int]]:
    """draft: [k] token ids; target: [k+1, V] logits (row j scores the token after draft j-1), or
    their argmax ids [k+1].

    Accept while draft j equals the target's argmax; then emit the target's argmax at the first
    mismatch (recovered) or after the last draft (bonus). Returns (accepted, emitted tokens).
    """
    choice = target.argmax(-1) if target.dim() == 2 else target  # [k+1]
    k = draft.shape[0]
    accepted = int((draft == choice[:k]).int().cumprod(0).sum()) if k else 0
    return accepted, [*draft[:accepted].tolist(), int(choice[accepted])]


def verify_sampled(
    draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator
) -> tuple[int, list[int]]:
    """draft: [k] ids; q: [k, V] the distributions the drafts were sampled from; p: [k+1, V] the
    target's processed distributions; generator: the session's random stream.

    Accept draft x with probability min(1, p(x)/q(x)); at the first rejection sample from
    normalize(max(0, p - q)); if all survive, sample a bonus token from p[k]. The emitted tokens
    then follow p exactly, whatever q is (Leviathan et al. 2023, Chen et al. 2023).
    """
    k = draft.shape[0]
    for j in range(k):
        x = int(draft[j])
        px, qx = float(p[j, x]), float(q[j, x])
        u = float(torch.rand((), generator=generator, device=p.device))
        if qx > 0 and u * qx < px:
            continue
        residual = (p[j] - q[j]).clamp_min(0.0)
        total = float(residual.sum())
        # p == q on the support leaves no residual mass; then rejection had probability 0 anyway.
        dist = residual / total if total > 0 else p[j]
        return j, [*draft[:j].tolist(), _sample(dist, generator)]
    return k, [*draft.tolist(), _sample(p[k], generator)]


def _sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def dense(token_ids: list[int], probs: list[float], vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A sparse distribution (support ids and probabilities) as a dense [V] vector."""
    out = torch.zeros(vocab, device=device)
    if token_ids:
        out[torch.tensor(token_ids, device=device)] = torch.tensor(probs, device=device, dtype=out.dtype)
    return out
