"""The request both fronts hand to the gateway, free of any transport: the gRPC front builds it
from a `GenerateRequest`, the HTTP front from a JSON body, and `validate` turns it into a
`Sequence` (checking every field and naming the first bad one) before the scheduler sees it."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field

from gateway.sequence import Sequence, Slo
from specserve.contracts import SamplingParams
from specserve.errors import InvalidArgument
from specserve.strategy import MAX_DRAFT_TOKENS_LIMIT

CHAT_ROLES = ("system", "user", "assistant", "tool")
SPECULATION_MODES = ("", "off", "static")  # "" follows the deployment's strategy


@dataclass
class Limits:
    max_context: int
    max_new_tokens: int = 2048
    default_max_new_tokens: int = 128
    max_prompt_tokens: int = 0  # 0: the context window
    max_stop_strings: int = 16
    default_ttft_ms: float = 0.0
    default_tpot_ms: float = 0.0
    max_streams_per_client: int = 64
    session_prefix: str = ""  # "<owner>/": the model services know this gateway's sessions by it


@dataclass
class GenerateInput:
    """One generation request as a client sent it; exactly one of the three inputs is set."""

    prompt: str | None = None
    messages: list[tuple[str, str]] | None = None  # (role, content) turns, for the chat template
    prompt_token_ids: list[int] | None = None
    max_new_tokens: int = 0  # 0 takes the default
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0  # 0 takes 1 (no truncation)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # decode past end-of-sequence tokens (vLLM's and llama-server's field)
    slo: Slo = field(default_factory=Slo)
    priority: int = 0
    mode: str = ""
    static_k: int = 0
    request_id: str = ""


def prompt_tokens(request: GenerateInput, tokenizer, vocab: int) -> list[int]:
    kinds = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(request, name) is not None]
    if not kinds:
        raise InvalidArgument("input", "set one of prompt, messages or prompt_token_ids")
    if len(kinds) > 1:
        raise InvalidArgument("input", f"set only one input kind, got {', '.join(kinds)}")
    if kinds[0] == "prompt":
        if not request.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        return tokenizer.encode(request.prompt, add_special_tokens=False)
    if kinds[0] == "messages":
        if not request.messages:
            raise InvalidArgument("messages", "must hold at least one message")
        for i, (role, _) in enumerate(request.messages):
            if role not in CHAT_ROLES:
                raise InvalidArgument(f"messages[{i}].role", f"unknown role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        chat = [{"role": role, "content": content} for role, content in request.messages]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    ids = list(request.prompt_token_ids or [])
    if not ids:
        raise InvalidArgument("prompt_token_ids", "must not be empty")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidArgument("prompt_token_ids", f"token id {bad} is outside [0, {vocab})")
    return ids


def validate(request: GenerateInput, tokenizer, vocab: int, limits: Limits) -> Sequence:
    """Validate every field (the error names the first bad one) and build the request's state."""
    if not 0 <= request.max_new_tokens <= limits.max_new_tokens:
        raise InvalidArgument("sampling.max_new_tokens", f"must be in [0, {limits.max_new_tokens}] (0 takes the "
                              f"default, {limits.default_max_new_tokens}), got {request.max_new_tokens}")
    if request.top_p < 0:
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {request.top_p}")
    if len(request.stop) > limits.max_stop_strings:
        raise InvalidArgument("sampling.stop", f"at most {limits.max_stop_strings} stop strings")
    params = SamplingParams(request.max_new_tokens or limits.default_max_new_tokens, request.temperature,
                            request.top_k, request.top_p or 1.0, request.seed, tuple(request.stop))
    params = params.validate("sampling", max_new_tokens_limit=limits.max_new_tokens)
    for name in ("ttft_ms", "tpot_ms", "deadline_ms"):
        if getattr(request.slo, name) < 0:
            raise InvalidArgument(f"slo.{name}", f"must be >= 0, got {getattr(request.slo, name)}")
    prompt = prompt_tokens(request, tokenizer, vocab)
    max_prompt = min(limits.max_prompt_tokens or limits.max_context, limits.max_context - 1)
    if len(prompt) > max_prompt:
        raise InvalidArgument("prompt", f"{len(prompt)} tokens exceed the limit of {max_prompt}")
    if len(prompt) + params.max_new_tokens > limits.max_context:
        params = dataclasses.replace(params, max_new_tokens=limits.max_context - len(prompt))
    if request.mode not in SPECULATION_MODES:
        raise InvalidArgument("speculation.mode", f"unknown mode {request.mode!r}")
    if request.mode == "static" and not 0 <= request.static_k <= MAX_DRAFT_TOKENS_LIMIT:
        raise InvalidArgument("speculation.static_k", f"must be in [0, {MAX_DRAFT_TOKENS_LIMIT}], got {request.static_k}")
    slo = Slo(request.slo.ttft_ms or limits.default_ttft_ms, request.slo.tpot_ms or limits.default_tpot_ms,
              request.slo.deadline_ms, request.slo.best_effort)
    # The session id is the gateway's own: two requests may send the same request_id.
    return Sequence(limits.session_prefix + uuid.uuid4().hex, prompt, params, slo, request.priority, request.mode,
                    request.static_k if request.mode == "static" else 0, request_id=request.request_id,
                    ignore_eos=request.ignore_eos)
