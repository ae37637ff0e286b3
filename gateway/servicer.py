"""Gateway servicer: validate a request, turn it into a Sequence, stream its deltas back."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from gateway.admission import Admission, attainment
from gateway.scheduler import Scheduler
from gateway.sequence import Finish, Sequence, Slo
from specserve import __version__, codec
from specserve.errors import InvalidArgument, ResourceExhausted, Unavailable
from specserve.server import api_key
from specserve.v1 import gateway_pb2, gateway_pb2_grpc

CHAT_ROLES = ("system", "user", "assistant", "tool")

_FINISH_TO_PB = {
    Finish.LENGTH: gateway_pb2.FINISH_REASON_LENGTH,
    Finish.EOS: gateway_pb2.FINISH_REASON_EOS,
    Finish.STOP: gateway_pb2.FINISH_REASON_STOP,
    Finish.DEADLINE: gateway_pb2.FINISH_REASON_DEADLINE,
}


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


def prompt_tokens(request: gateway_pb2.GenerateRequest, tokenizer, vocab: int) -> list[int]:
    kinds = [name for name in ("prompt", "messages", "prompt_token_ids") if request.HasField(name)]
    if not kinds:
        raise InvalidArgument("input", "set one of prompt, messages or prompt_token_ids")
    if len(kinds) > 1:
        raise InvalidArgument("input", f"set only one input kind, got {', '.join(kinds)}")
    if kinds[0] == "prompt":
        if not request.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        return tokenizer.encode(request.prompt, add_special_tokens=False)
    if kinds[0] == "messages":
        turns = request.messages.messages
        if not turns:
            raise InvalidArgument("messages", "must hold at least one message")
        for i, m in enumerate(turns):
            if m.role not in CHAT_ROLES:
                raise InvalidArgument(f"messages[{i}].role", f"unknown role {m.role!r}; use one of {', '.join(CHAT_ROLES)}")
        chat = [{"role": m.role, "content": m.content} for m in turns]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    ids = list(request.prompt_token_ids.ids)
    if not ids:
        raise InvalidArgument("prompt_token_ids", "must not be empty")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidArgument("prompt_token_ids", f"token id {bad} is outside [0, {vocab})")
    return ids


def to_sequence(request: gateway_pb2.GenerateRequest, tokenizer, vocab: int, limits: Limits) -> Sequence:
    """Validate every field (the error names the first bad one) and build the request's state."""
    sampling = request.sampling
    if not 0 <= sampling.max_new_tokens <= limits.max_new_tokens:
        raise InvalidArgument("sampling.max_new_tokens", f"must be in [0, {limits.max_new_tokens}] (0 takes the "
                              f"default, {limits.default_max_new_tokens}), got {sampling.max_new_tokens}")
    if sampling.top_p < 0:
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {sampling.top_p}")
    if len(sampling.stop) > limits.max_stop_strings:
        raise InvalidArgument("sampling.stop", f"at most {limits.max_stop_strings} stop strings")
    params = codec.sampling_from_pb(sampling, limits.default_max_new_tokens).validate(
        "sampling", max_new_tokens_limit=limits.max_new_tokens)
    for name in ("ttft_ms", "tpot_ms", "deadline_ms"):
        if getattr(request.slo, name) < 0:
            raise InvalidArgument(f"slo.{name}", f"must be >= 0, got {getattr(request.slo, name)}")
    prompt = prompt_tokens(request, tokenizer, vocab)
    max_prompt = min(limits.max_prompt_tokens or limits.max_context, limits.max_context - 1)
    if len(prompt) > max_prompt:
        raise InvalidArgument("prompt", f"{len(prompt)} tokens exceed the limit of {max_prompt}")
    if len(prompt) + params.max_new_tokens > limits.max_context:
        params = dataclasses.replace(params, max_new_tokens=limits.max_context - len(prompt))
    spec = request.speculation
    if spec.mode not in gateway_pb2.SpeculationMode.values():
        raise InvalidArgument("speculation.mode", f"unknown value {spec.mode}; use one of "
                              + ", ".join(gateway_pb2.SpeculationMode.keys()))
    mode = {gateway_pb2.SPECULATION_MODE_OFF: "off", gateway_pb2.SPECULATION_MODE_STATIC: "static"}.get(spec.mode, "")
    if mode == "static" and not 0 <= spec.static_k <= 64:
        raise InvalidArgument("speculation.static_k", f"must be in [0, 64], got {spec.static_k}")
    slo = Slo(request.slo.ttft_ms or limits.default_ttft_ms, request.slo.tpot_ms or limits.default_tpot_ms,
              request.slo.deadline_ms, request.slo.best_effort)
    return Sequence(request.request_id or uuid.uuid4().hex, prompt, params, slo, request.priority, mode,
                    spec.static_k if mode == "static" else 0)


def stats_to_pb(seq: Sequence) -> gateway_pb2.GenerateStats:
    a = attainment(seq)
    return gateway_pb2.GenerateStats(
        prompt_tokens=len(seq.prompt), output_tokens=len(seq.generated), ttft_ms=seq.ttft_ms, tpot_ms=seq.tpot_ms,
        steps=seq.steps, draft_tokens=seq.draft_tokens, accepted_tokens=seq.accepted_tokens,
        slo_attained=a.slo, ttft_attained=a.ttft, tpot_attained=a.tpot, deadline_attained=a.deadline,
        best_effort=seq.unattainable, total_ms=((seq.last_token_at or seq.arrival) - seq.arrival) * 1000,
        speculation=speculation_summary(seq))


def speculation_summary(seq: Sequence) -> str:
    if seq.draft_tokens:
        return f"speculated: {seq.accepted_tokens}/{seq.draft_tokens} drafts accepted"
    return f"plain decoding: {seq.plain_reason or 'no drafts were proposed'}"


def _client_id(context) -> str:
    """The API key when one was sent, else the peer's address without its port."""
    return api_key(context.invocation_metadata()) or context.peer().rsplit(":", 1)[0]


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Registered before the server starts; answers UNAVAILABLE until `attach` (models ready)."""

    scheduler: Scheduler | None = None
    info: gateway_pb2.GatewayInfo | None = None

    def __init__(self):
        self.streams: dict[str, int] = {}  # open Generate streams per client
        self.on_reject: Callable[[str], None] = lambda reason: None  # refusals other than admission's

    def attach(self, scheduler: Scheduler, tokenizer, vocab: int, limits: Limits, info: gateway_pb2.GatewayInfo,
               admission: Admission) -> None:
        self.tokenizer, self.vocab, self.limits = tokenizer, vocab, limits
        self.info, self.admission = info, admission
        self.scheduler = scheduler

    def _ready(self) -> Scheduler:
        if self.scheduler is None:
            raise Unavailable("the gateway is starting; its model services are not ready yet")
        return self.scheduler

    def open_stream(self, request: gateway_pb2.GenerateRequest, client: str) -> Sequence:
        """Validate, admit and submit a request from `client` (any front: gRPC or HTTP); pair with
        `close_stream`."""
        try:
            self._ready()
        except Unavailable:
            self.on_reject("unavailable")
            raise
        if self.streams.get(client, 0) >= self.limits.max_streams_per_client:
            self.on_reject("client_limit")
            raise ResourceExhausted(f"at most {self.limits.max_streams_per_client} concurrent streams per client",
                                    retry_after_ms=500)
        try:
            seq = to_sequence(request, self.tokenizer, self.vocab, self.limits)
        except InvalidArgument:
            self.on_reject("invalid_argument")
            raise
        self.admission.admit(seq)  # counts its own rejections ("slo")
        try:
            self.scheduler.submit(seq)
        except ResourceExhausted:
            self.on_reject("queue_full")
            raise
        self.streams[client] = self.streams.get(client, 0) + 1
        return seq

    def close_stream(self, seq: Sequence, client: str, cancelled: bool) -> None:
        """The stream is over; a cancelled one frees its sessions on both model services."""
        if cancelled:
            self.scheduler.cancel(seq)
        self.streams[client] -= 1
        if not self.streams[client]:
            del self.streams[client]

    async def Generate(self, request, context):
        client = _client_id(context)
        seq = self.open_stream(request, client)
        cancelled = False
        try:
            while True:
                delta = await seq.out.get()
                if delta.error is not None:
                    raise delta.error
                if delta.finish is Finish.CANCELLED:
                    return
                message = gateway_pb2.GenerateResponse(request_id=seq.id, token_ids=delta.token_ids, text=delta.text)
                if delta.finish is not None:
                    message.finish_reason = _FINISH_TO_PB[delta.finish]
                    message.stats.CopyFrom(stats_to_pb(seq))
                    yield message
                    return
                if delta.token_ids or delta.text:
                    yield message
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            self.close_stream(seq, client, cancelled)

    async def Info(self, request, context):
        self._ready()
        info = gateway_pb2.GatewayInfo()
        info.CopyFrom(self.info)
        info.drafter_available = self.scheduler.drafter_available
        info.version = __version__
        return info
