"""The runtime interface: the rows of a batched forward, what a runtime reports about itself, the
protocol both runtimes implement, and where a model reference's files are."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from specserve.errors import InvalidArgument

if TYPE_CHECKING:
    import torch


@dataclass
class Row:
    """One session's part of a batched forward."""

    session_id: str
    tokens: list[int]  # [w] new token ids, appended after the session's cached length
    keep: list[int]  # indices into `tokens` whose next-token logits to return
    argmax: bool = False  # return the argmax ids [len(keep)] instead of logits (greedy: no row copies)
    reused: int = 0  # set by the runtime: leading tokens whose KV came from the prefix cache


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
        """One batched ragged forward; per row, float32 logits [len(row.keep), vocab_size], or the
        argmax ids [len(row.keep)] where `row.argmax`. A row that starts a session may take the KV
        of the longest cached prefix of its tokens (up to its first kept index); `row.reused` says
        how many tokens that saved."""

    def length(self, session_id: str) -> int:
        """Tokens cached for the session (0 when unknown)."""

    def truncate(self, session_id: str, length: int) -> None:
        """Keep the session's first `length` cached positions (rollback to a committed prefix)."""

    def release(self, session_id: str) -> None:
        """End the session; its KV stays as prefix cache until the room is needed."""

    @property
    def kv_tokens(self) -> int:
        """Positions held over all live sessions."""

    @property
    def cached_tokens(self) -> int:
        """Positions held as prefix cache by released sessions."""


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
