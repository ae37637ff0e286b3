"""Small dataclasses passed between the gateway's step loop and the model services.

The gRPC servicers and clients convert these to and from protobuf; the in-process workers take
and return them directly, so the step loop runs the same way in one process or over the network.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from specserve.sampling import SamplingParams

# A sparse distribution: (support token ids, their probabilities).
Sparse = tuple[list[int], list[float]]


class SessionStatus(enum.Enum):
    OK = 1
    NOT_FOUND = 2  # unknown, evicted or out of sync: send the whole committed sequence again


@dataclass
class PrefillItem:
    session_id: str
    prompt: list[int]  # [L] token ids: the prompt, or its next chunk
    params: SamplingParams
    partial: bool = False  # more chunks follow: extend the cache only
    append: bool = False  # continue the session's earlier partial prefill


@dataclass
class PrefillResult:
    session_id: str
    token_id: int  # the first generated token; -1 after a partial chunk


@dataclass
class PrefillOutput:
    results: list[PrefillResult]
    forward_ns: int


@dataclass
class ProposeItem:
    session_id: str
    position: int  # committed tokens the drafter already saw; 0 (re)starts the session
    new_tokens: list[int]  # tokens committed since `position`
    max_draft_tokens: int
    params: SamplingParams
    stop_confidence: float = 0.0  # stop once the cumulative confidence is below this
    min_token_confidence: float = 0.0  # stop once the latest token's confidence is below this
    extend: bool = False  # draft further after the previous call's drafts

    @classmethod
    def make_dummy(cls, session_id: str = "s0", tokens: list[int] | None = None, k: int = 3) -> "ProposeItem":
        return cls(session_id, 0, tokens or [1, 2, 3], k, SamplingParams())


@dataclass
class Draft:
    session_id: str
    status: SessionStatus
    tokens: list[int] = field(default_factory=list)  # [k]
    confidences: list[float] = field(default_factory=list)  # [k] draft probability of each token
    distributions: list[Sparse] = field(default_factory=list)  # [k] or [] for greedy drafts


@dataclass
class ProposeOutput:
    drafts: list[Draft]
    draft_steps: int  # forward passes of the draft loop
    draft_ns: int


@dataclass
class VerifyItem:
    session_id: str
    position: int  # committed tokens the caller believes the session holds
    drafts: list[int]  # [k]; none is a plain decode step
    distributions: list[Sparse] = field(default_factory=list)  # [k] when sampling

    @classmethod
    def make_dummy(cls, session_id: str = "s0", position: int = 4, drafts: list[int] | None = None) -> "VerifyItem":
        return cls(session_id, position, drafts or [])


@dataclass
class VerifyResult:
    session_id: str
    status: SessionStatus
    tokens: list[int] = field(default_factory=list)  # accepted drafts, then the recovered or bonus token
    accepted: int = 0


@dataclass
class VerifyOutput:
    results: list[VerifyResult]
    verified_positions: int  # sum over sessions of drafts + 1
    forward_ns: int


@dataclass
class WorkerInfo:
    model_id: str
    tokenizer_fingerprint: str
    max_context: int
    device: str
    dtype: str
    eos_token_ids: list[int]
    sessions: int
    kv_tokens: int
    runtime: str = ""  # "torch" or "llama.cpp"
    model_file: str = ""
