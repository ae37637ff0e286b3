"""Per-session KV caches and the ragged batched forward pass over them.

Each session keeps its own keys and values. A batched step left-pads the sessions' caches to one
length, appends each session's new tokens (right-padded), runs one forward with explicit positions
and a padding mask, and hands each session back its own slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class SessionKV:
    """The KV cache of one session: per layer (keys, values), each [1, H, L, D]; empty before prefill."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    def crop(self, length: int) -> None:
        """Keep the first `length` positions (rollback to a committed prefix)."""
        assert 0 <= length <= self.length, (length, self.length)
        self.layers = [(k[:, :, :length], v[:, :, :length]) for k, v in self.layers]


class BatchForward:
    """A batch of sessions run together for one or more forward steps.

    Rows are left-padded to one past length and new tokens right-padded to one width; the padding
    mask keeps every pad invisible, so a multi-step loop (drafting) stacks the caches only once.
    `select` drops rows that are done; `split` returns each row's real positions as its own cache.
    """

    def __init__(self, model: torch.nn.Module, caches: list[SessionKV]):
        self.model = model
        self.device = next(model.parameters()).device
        self.lengths = [c.length for c in caches]  # real tokens per row
        past = max(self.lengths, default=0)
        self.mask = torch.zeros(len(caches), past, dtype=torch.long, device=self.device)
        for row, n in enumerate(self.lengths):
            self.mask[row, past - n :] = 1
        self.cache = DynamicCache()
        if past:
            template = next(c for c in caches if c.length)
            for layer in range(len(template.layers)):
                keys = torch.cat([_left_pad(c, template, layer, 0, past) for c in caches])
                values = torch.cat([_left_pad(c, template, layer, 1, past) for c in caches])
                self.cache.update(keys, values, layer)

    def step(self, tokens: list[list[int]], keep: list[list[int]]) -> list[torch.Tensor]:
        """tokens: per row, the new token ids (ragged, at least one); keep: per row, indices into
        that row's new tokens whose next-token logits to return. Returns per row [len(keep), V]."""
        rows, width = len(tokens), max(len(t) for t in tokens)
        ids = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        new_mask = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        for r, t in enumerate(tokens):
            ids[r, : len(t)] = torch.tensor(t, device=self.device)
            new_mask[r, : len(t)] = 1
        start = torch.tensor(self.lengths, device=self.device).unsqueeze(1)
        positions = start + torch.arange(width, device=self.device).unsqueeze(0)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        hidden = self.model.base_model(
            input_ids=ids, attention_mask=self.mask, position_ids=positions,
            past_key_values=self.cache, use_cache=True,
        ).last_hidden_state  # [rows, width, hidden]
        self.lengths = [n + len(t) for n, t in zip(self.lengths, tokens)]
        picked = torch.cat([hidden[r, idx] for r, idx in enumerate(keep)])
        logits = self.model.get_output_embeddings()(picked).float()
        return list(torch.split(logits, [len(idx) for idx in keep]))

    def select(self, rows: list[int]) -> None:
        """Keep only these rows, in this order."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.lengths = [self.lengths[r] for r in rows]

    def split(self, rows: list[int] | None = None) -> list[SessionKV]:
        """Each row's own cache (or those of `rows`): its real positions only, without padding."""
        out = []
        for r in range(len(self.lengths)) if rows is None else rows:
            n = self.lengths[r]
            if n == self.mask.shape[1]:
                layers = [(layer.keys[r : r + 1], layer.values[r : r + 1]) for layer in self.cache.layers]
            else:
                real = self.mask[r].nonzero().squeeze(1)
                layers = [(layer.keys[r : r + 1, :, real], layer.values[r : r + 1, :, real])
                          for layer in self.cache.layers]
            if len(self.lengths) > 1:
                # Own copies, so that a finished batch's tensors are freed.
                layers = [(k.contiguous().clone(), v.contiguous().clone()) for k, v in layers]
            out.append(SessionKV(layers))
        return out


def _left_pad(cache: SessionKV, template: SessionKV, layer: int, which: int, length: int) -> torch.Tensor:
    like = template.layers[layer][which]
    have = cache.layers[layer][which] if cache.layers else like[:, :, :0]
    missing = length - have.shape[2]
    if missing == 0:
        return have
    pad = torch.zeros(*like.shape[:2], missing, like.shape[3], dtype=like.dtype, device=like.device)
    return torch.cat([pad, have], dim=2)
