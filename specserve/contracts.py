"""Small dataclasses passed between the gateway's step loop and the model services (plain data:
no torch, so the gateway process never loads it).

The gRPC servicers and clients convert these to and from protobuf; the in-process workers take
and return them directly, so the step loop runs the same way in one process or over the network.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from specserve.errors import InvalidArgument

MAX_NEW_TOKENS_LIMIT = 8192
# A temperature below this decodes greedily (vLLM's sampling epsilon): dividing logits by a tiny
# positive temperature overflows to inf and the distribution to NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # below GREEDY_BELOW_TEMPERATURE (0 included) is greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

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


# A sparse distribution: (support token ids, their probabilities).
Sparse = tuple[list[int], list[float]]


class SessionStatus(enum.Enum):
    OK = 1
    NOT_FOUND = 2  # unknown, evicted or out of sync: send the whole committed sequence again
    INVALID = 3  # this item was malformed (its error names the field); the rest of the batch ran
    EXHAUSTED = 4  # no room for this item now; the rest of the batch ran


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
    cached_tokens: int = 0  # prompt tokens so far whose KV came from the prefix cache
    status: SessionStatus = SessionStatus.OK
    error: str = ""  # why this chunk alone did not run


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
    free_only: bool = False  # only drafts that cost no model (a hybrid drafter's suffix lookup)
    max_model_draft_tokens: int = 0  # most tokens a model may draft (free drafts: max_draft_tokens); 0: the same

    @property
    def model_budget(self) -> int:
        return min(self.max_draft_tokens, self.max_model_draft_tokens or self.max_draft_tokens)

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
    model_unread: int = 0  # committed tokens a hybrid drafter's model has not read (it reads them first)
    free: bool = False  # drafted by a proposer that runs no model (suffix, n-gram lookup)
    recalled: bool = False  # free drafts from other requests' outputs, not the session's own tokens


@dataclass
class ProposeOutput:
    drafts: list[Draft]
    draft_steps: int  # forward passes of the draft loop
    draft_ns: int


MAX_PLAIN_STEPS = 64  # the longest decode burst one verify call may ask for


@dataclass
class VerifyItem:
    session_id: str
    position: int  # committed tokens the caller believes the session holds
    drafts: list[int]  # [k]; none is a plain decode step
    distributions: list[Sparse] = field(default_factory=list)  # [k] when sampling
    plain_steps: int = 0  # without drafts: up to this many plain decode steps in one call (a burst)

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
    verified_positions: int  # positions in the step's forward: drafts + 1 per session, plus prompt tokens
    forward_ns: int
    prefills: list[PrefillResult] = field(default_factory=list)  # one per prompt chunk in the step
    forwards: int = 1  # forward passes run (more than one where a decode burst ran)


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
    free_drafts: bool = False  # the drafter's proposer runs no model (suffix, n-gram)
    hybrid: bool = False  # the drafter offers free drafts beside its model's
    instance_id: str = ""  # a new id at every start of the service: its caches start empty
