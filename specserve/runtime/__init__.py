"""Model runtimes: one interface under the drafter and the verifier, two implementations.

A runtime holds one model and the KV state of every session it serves, addressed by session id.
Its one compute call is a batched ragged forward: each row is a session with its new tokens and the
indices (into those tokens) whose next-token logits are wanted. KV stays in place between calls:
a forward appends each row's keys and values at that session's positions, `truncate` rolls a
session back to a committed prefix, `release` ends it. A released session's KV stays as prefix
cache until its room is needed: a new session starting with the same tokens reuses it (prefix.py).

- `torch`: transformers (any Hugging Face folder or id; CPU or CUDA).
- `llama.cpp`: llama-cpp-python over a GGUF file; one sequence id per session.
"""

from __future__ import annotations

from typing import Literal

from specserve.errors import InvalidArgument
from specserve.runtime.base import Row, Runtime, RuntimeInfo, find_gguf, has_torch_weights

__all__ = ["RUNTIMES", "Row", "Runtime", "RuntimeInfo", "choose", "find_gguf", "has_torch_weights", "open_runtime"]

RUNTIMES = ("auto", "torch", "llama.cpp")


def open_runtime(model: str, name: str = "auto", device: str = "cpu", dtype: str = "auto", max_context: int = 0,
                 threads: int = 0, max_sessions: int = 64, kv_tokens: int = 16384, kv_unified: bool = True,
                 prefix_cache_mb: int = 1024) -> Runtime:
    """Open `model` on the runtime `name` picks (the llama.cpp options apply to llama.cpp only; on
    torch, `kv_tokens` bounds the prefix cache)."""
    if choose(name, model, device) == "llama.cpp":
        from specserve.runtime.llama_runtime import LlamaCppRuntime

        gguf = find_gguf(model)
        if gguf is None:
            raise InvalidArgument("model", f"the llama.cpp runtime needs a GGUF file; none at {model}")
        return LlamaCppRuntime(gguf, max_context, max_sessions, kv_tokens, threads, kv_unified,
                               cache_bytes=prefix_cache_mb << 20)
    from specserve.runtime import torch_runtime

    return torch_runtime.load(model, device, dtype, max_context, kv_tokens)


def choose(name: str, model: str, device: str) -> Literal["torch", "llama.cpp"]:
    """`auto`: llama.cpp for a GGUF model unless a CUDA device is asked for and torch weights exist."""
    if name not in RUNTIMES:
        raise InvalidArgument("runtime", f"must be one of {', '.join(RUNTIMES)}, got {name!r}")
    if name != "auto":
        return name  # type: ignore[return-value]
    gguf = find_gguf(model)
    if gguf is not None and not (device.startswith("cuda") and has_torch_weights(model)):
        return "llama.cpp"
    return "torch"
