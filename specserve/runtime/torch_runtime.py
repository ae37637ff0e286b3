"""The torch runtime: a transformers model with each session's KV written in place.

Each session owns per-layer key and value buffers, [1, H, capacity, D], grown by doubling, so a
step never copies the batch's caches: one forward runs every row's linear layers together, and
attention runs per row over a view of that row's own buffers (the `specserve_ragged` attention
function, handed the rows through the model's `attention_mask` argument). Rollback only moves a
length. On the CPU, the layout of each linear layer's matmul is chosen per shape by measuring both
at start-up.
"""

from __future__ import annotations

import logging
import statistics
import time
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from specserve import cpu
from specserve.errors import InvalidArgument
from specserve.runtime.base import Row, RuntimeInfo, find_gguf, has_torch_weights
from specserve.runtime.prefix import MIN_REUSE, PrefixIndex
from specserve.runtime.prefix import skip as _skip

log = logging.getLogger(__name__)

ATTENTION = "specserve_ragged"
MIN_CAPACITY = 64  # positions a new session's buffers start with; doubled as it grows


@dataclass
class SessionCache:
    """One session's keys and values, per layer [1, H, capacity, D]; `length` positions are valid."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    length: int = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [1, H, w, D] at positions start..start+w-1 -> views of positions 0..start+w-1."""
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        end = start + k.shape[2]
        if self.keys[layer] is None or self.keys[layer].shape[2] < end:
            self.keys[layer] = _grown(self.keys[layer], k, start, end)
            self.values[layer] = _grown(self.values[layer], v, start, end)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def prefix(self, n: int) -> "SessionCache":
        """A new cache holding copies of this one's first n positions."""
        copy = SessionCache(length=n)
        for k, v in zip(self.keys, self.values):
            copy.keys.append(None if k is None else _grown(None, k, 0, n))
            copy.values.append(None if v is None else _grown(None, v, 0, n))
            if k is not None:
                copy.keys[-1][:, :, :n] = k[:, :, :n]
                copy.values[-1][:, :, :n] = v[:, :, :n]
        return copy


def _grown(old: torch.Tensor | None, like: torch.Tensor, keep: int, need: int) -> torch.Tensor:
    capacity = max(need, MIN_CAPACITY, 2 * (old.shape[2] if old is not None else 0))
    buf = like.new_empty(like.shape[0], like.shape[1], capacity, like.shape[3])
    if old is not None and keep:
        buf[:, :, :keep] = old[:, :, :keep]
    return buf


@dataclass
class RaggedBatch:
    """The rows of one forward, as the attention function sees them."""

    caches: list[SessionCache]
    starts: list[int]  # cached positions before this forward
    widths: list[int]  # new tokens per row
    masks: list[torch.Tensor | None]  # per row [w, start + w] causal mask, None for w = 1


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query: [B, Hq, W, D]; key, value: [B, Hkv, W, D], the rows' new positions (right-padded).
    Returns [B, W, Hq, D]. Anything but a RaggedBatch (Hugging Face generate) goes to SDPA."""
    if not isinstance(attention_mask, RaggedBatch):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    batch = attention_mask
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for r, (cache, start, w, mask) in enumerate(zip(batch.caches, batch.starts, batch.widths, batch.masks)):
        k, v = cache.write(module.layer_idx, key[r : r + 1, :, :w], value[r : r + 1, :, :w], start)
        o = F.scaled_dot_product_attention(query[r : r + 1, :, :w], k, v, attn_mask=mask, scale=scaling,
                                           enable_gqa=query.shape[1] != k.shape[1])
        out[r, :w] = o[0].transpose(0, 1)
    return out, None


AttentionInterface.register(ATTENTION, ragged_attention)


class TorchRuntime:
    """Not thread-safe: call from one worker thread."""

    def __init__(self, model: torch.nn.Module, model_file: str = "", eos_token_ids: list[int] | None = None,
                 max_context: int = 0, max_cached_tokens: int = 16384):
        self.model = model
        if model.config._attn_implementation != ATTENTION:
            model.set_attn_implementation(ATTENTION)
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        limit = getattr(model.config, "max_position_embeddings", 4096)
        self.max_context = min(max_context or limit, limit)
        self.info = RuntimeInfo("torch", model_file, str(self.device), str(model.dtype).removeprefix("torch."),
                                list(eos_token_ids or []))
        self.caches: dict[str, SessionCache] = {}
        self.prefix = PrefixIndex()
        self.retired: dict[str, SessionCache] = {}  # released sessions' KV, kept as prefix cache
        self.max_cached_tokens = max_cached_tokens
        self.forward_ns = 0  # time inside the model's forward, summed (for overhead measurements)

    @property
    def kv_tokens(self) -> int:
        return sum(c.length for c in self.caches.values())

    @property
    def cached_tokens(self) -> int:
        return self.prefix.retired_tokens

    def length(self, session_id: str) -> int:
        cache = self.caches.get(session_id)
        return cache.length if cache else 0

    def truncate(self, session_id: str, length: int) -> None:
        cache = self.caches.get(session_id)
        assert 0 <= length <= (cache.length if cache else 0), (session_id, length)
        if cache is not None:
            cache.length = length
            self.prefix.truncate(session_id, length)

    def release(self, session_id: str) -> None:
        """The KV stays as prefix cache, within `max_cached_tokens`, least recently used first out."""
        cache = self.caches.pop(session_id, None)
        name = self.prefix.retire(session_id) if cache is not None else None
        if name is not None:
            self.retired[name] = cache
        while self.prefix.retired_tokens > self.max_cached_tokens:
            oldest = self.prefix.oldest_retired()
            self.prefix.drop(oldest)
            del self.retired[oldest]

    def _reuse(self, row: Row) -> Row:
        """A row that reads a prompt (or its next chunk) copies the KV of the longest cached prefix
        of the session's tokens and runs only the rest."""
        if not self.max_cached_tokens or not row.keep or row.keep[0] < MIN_REUSE:
            return row
        held = self.length(row.session_id)
        source, n = self.prefix.longest(row.session_id, row.tokens, row.keep[0])
        if source is None:
            return row
        self.caches[row.session_id] = (self.retired.get(source) or self.caches[source]).prefix(n)
        return _skip(row, n - held, self.prefix)

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> list[torch.Tensor]:
        rows = [self._reuse(r) for r in rows]
        caches = [self.caches.setdefault(r.session_id, SessionCache()) for r in rows]
        starts = [c.length for c in caches]
        widths = [len(r.tokens) for r in rows]
        width = max(widths)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r.tokens)] = torch.tensor(r.tokens)
        positions = torch.tensor(starts).unsqueeze(1) + torch.arange(width).unsqueeze(0)
        masks = [None if w == 1 else
                 torch.arange(s + w, device=self.device) <= (s + torch.arange(w, device=self.device)).unsqueeze(1)
                 for s, w in zip(starts, widths)]
        batch = RaggedBatch(caches, starts, widths, masks)
        started = time.perf_counter_ns()
        hidden = self.model.base_model(
            input_ids=ids.to(self.device), position_ids=positions.to(self.device), use_cache=False,
            attention_mask={"full_attention": batch, "sliding_attention": batch},
        ).last_hidden_state  # [rows, width, hidden]
        picked = torch.cat([hidden[i, r.keep] for i, r in enumerate(rows)])
        logits = self.model.get_output_embeddings()(picked).float()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the logits are read next anyway; time the kernels, not their launch
        self.forward_ns += time.perf_counter_ns() - started
        for r, cache, w in zip(rows, caches, widths):
            cache.length += w
            self.prefix.tokens(r.session_id).extend(r.tokens)
        out = torch.split(logits, [len(r.keep) for r in rows])
        return [o.argmax(-1) if r.argmax else o for r, o in zip(rows, out)]


def load(path: str, device: str = "cpu", dtype: str = "auto", max_context: int = 0,
         max_cached_tokens: int = 16384) -> TorchRuntime:
    model = load_causal_lm(path, device, dtype)
    if device == "cpu":
        choose_matmul_layout(model)
    return TorchRuntime(model, path, generation_eos_ids(model), max_context, max_cached_tokens)


def resolve_dtype(name: str, device: str):
    """`auto`: bf16 where the CPU computes it natively (avx512_bf16 or AMX), fp32 on other CPUs,
    and the checkpoint's own dtype on CUDA."""
    if name != "auto":
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
        except KeyError:
            raise InvalidArgument("dtype", f"unknown dtype {name!r}") from None
    if device.startswith("cuda"):
        return "auto"
    return torch.bfloat16 if cpu.has_native_bf16() else torch.float32


def load_causal_lm(path: str, device: str = "cpu", dtype: str = "auto"):
    """Load a model from a local folder or hub id, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    gguf = find_gguf(path)
    if gguf is not None and not has_torch_weights(path):
        # Dequantized on load (slow, and the full-precision size in memory); `specserve models
        # prepare --torch` converts the built-in pair once instead.
        log.warning("loading %s into torch from GGUF (dequantizing)", gguf)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=resolve_dtype(dtype, device))
        return model.to(torch.device(device)).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device))
    return model.to(torch.device(device)).eval()


def generation_eos_ids(model) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config else None
    return ids if isinstance(ids, list) else [ids] if ids is not None else []



LAYOUT_ROWS = (2, 3, 4, 6, 8, 12, 16)  # few-row shapes where BLAS kernels differ most
LAYOUT_REPEATS = 3


def choose_matmul_layout(model: torch.nn.Module, rows: tuple[int, ...] = LAYOUT_ROWS) -> dict:
    """Per linear-layer shape and row count, time x @ W^T against W @ x^T once and keep the faster.

    Which is faster depends on the CPU and the BLAS kernels it gets: on one AVX2 machine W @ x^T was
    2-3x faster for 2 to 16 rows, on an AVX-512 machine 30% to 2.5x slower. So it is measured here.
    Returns {weight shape: row counts that run weight-major}.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    chosen: dict[tuple[int, int], frozenset[int]] = {}
    with torch.inference_mode():
        for shape in {tuple(m.weight.shape) for m in linears}:
            weight = next(m.weight for m in linears if tuple(m.weight.shape) == shape)
            wins = {n for n in rows if _time(lambda x: x @ weight.T, n, weight) > _time(lambda x: (weight @ x.T).T, n, weight)}
            # Row counts between those measured follow the nearest one measured.
            chosen[shape] = frozenset(n for n in range(2, rows[-1] + 1)
                                      if min(rows, key=lambda m: abs(m - n)) in wins)
    for module in linears:
        wins = chosen[tuple(module.weight.shape)]
        if wins:
            module.weight_major_rows = wins
            module.forward = types.MethodType(_forward_choosing_layout, module)
    log.info("weight-major matmul chosen for %s", {s: sorted(r) for s, r in chosen.items() if r} or "no shape")
    return chosen


def _time(fn, rows: int, weight: torch.Tensor) -> float:
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    fn(x)
    samples = []
    for _ in range(LAYOUT_REPEATS):
        started = time.perf_counter()
        fn(x)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _forward_choosing_layout(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows not in self.weight_major_rows:
        return F.linear(x, self.weight, self.bias)
    out = (self.weight @ x.reshape(rows, x.shape[-1]).T).T
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.weight.shape[0])
