"""Model runtimes: one interface under the drafter and the verifier, two implementations.

A runtime holds one model and the KV state of every session it serves, addressed by session id.
Its one compute call is a batched ragged forward: each row is a session with its new tokens and the
indices (into those tokens) whose next-token logits are wanted. KV stays in place between calls:
a forward appends each row's keys and values at that session's positions, `truncate` rolls a
session back to a committed prefix, `release` frees it.

- `torch`: transformers (any Hugging Face folder or id; CPU or CUDA).
- `llama.cpp`: llama-cpp-python over a GGUF file; one sequence id per session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from specserve.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

RUNTIMES = ("auto", "torch", "llama.cpp")


@dataclass
class Row:
    """One session's part of a batched forward."""

    session_id: str
    tokens: list[int]  # [w] new token ids, appended after the session's cached length
    keep: list[int]  # indices into `tokens` whose next-token logits to return


@dataclass
class RuntimeInfo:
    runtime: str  # "torch" or "llama.cpp"
    model_file: str  # the folder, id or GGUF file loaded
    device: str
    dtype: str  # torch dtype, or the GGUF's quantization
    eos_token_ids: list[int] = field(default_factory=list)


class Runtime(Protocol):
    info: RuntimeInfo
    vocab_size: int  # rows of the output layer: logits are [*, vocab_size]
    max_context: int  # longest sequence one session may hold
    device: torch.device  # where logits live

    def forward(self, rows: list[Row]) -> list[torch.Tensor]:
        """One batched ragged forward; per row, float32 logits [len(row.keep), vocab_size]."""

    def length(self, session_id: str) -> int:
        """Tokens cached for the session (0 when unknown)."""

    def truncate(self, session_id: str, length: int) -> None:
        """Keep the session's first `length` cached positions (rollback to a committed prefix)."""

    def release(self, session_id: str) -> None:
        """Free the session's KV; a later forward starts it afresh."""

    @property
    def kv_tokens(self) -> int:
        """Positions held over all sessions."""


def find_gguf(model: str) -> Path | None:
    """The GGUF file a model reference names: the file itself, or the one GGUF in a folder."""
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise InvalidArgument("model", f"{model} holds several GGUF files; name one")
        return found[0] if found else None
    return None


def has_torch_weights(model: str) -> bool:
    path = Path(model)
    if not path.is_dir():
        return not path.exists()  # a hub id: transformers resolves it
    weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return (path / "config.json").exists() and weights


def open_runtime(model: str, name: str = "auto", device: str = "cpu", dtype: str = "auto", max_context: int = 0,
                 threads: int = 0, max_sessions: int = 64, kv_tokens: int = 16384, kv_unified: bool = True) -> Runtime:
    """Open `model` on the runtime `name` picks (the llama.cpp options apply to llama.cpp only)."""
    if choose(name, model, device) == "llama.cpp":
        from specserve.runtime.llama_runtime import LlamaCppRuntime

        gguf = find_gguf(model)
        if gguf is None:
            raise InvalidArgument("model", f"the llama.cpp runtime needs a GGUF file; none at {model}")
        return LlamaCppRuntime(gguf, max_context, max_sessions, kv_tokens, threads, kv_unified)
    from specserve.runtime import torch_runtime

    return torch_runtime.load(model, device, dtype, max_context)


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
