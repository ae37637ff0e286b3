"""Gateway servicer: the gRPC front, and the stream path both fronts share: open a stream (limits,
validation, admission, submission), read its deltas, close it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from gateway.admission import Admission, attainment
from gateway.request import GenerateInput, Limits, validate
from gateway.scheduler import Scheduler
from gateway.sequence import Delta, Finish, Sequence, Slo
from specserve import __version__
from specserve.errors import InvalidArgument, ResourceExhausted, Unavailable
from specserve.server import api_key
from specserve.v1 import gateway_pb2, gateway_pb2_grpc

_FINISH_TO_PB = {
    Finish.LENGTH: gateway_pb2.FINISH_REASON_LENGTH,
    Finish.EOS: gateway_pb2.FINISH_REASON_EOS,
    Finish.STOP: gateway_pb2.FINISH_REASON_STOP,
    Finish.DEADLINE: gateway_pb2.FINISH_REASON_DEADLINE,
}
_MODE_FROM_PB = {gateway_pb2.SPECULATION_MODE_OFF: "off", gateway_pb2.SPECULATION_MODE_STATIC: "static"}


def input_from_pb(request: gateway_pb2.GenerateRequest) -> GenerateInput:
    """The gRPC front's request as the transport-free input (enum values checked here, where the
    proto's names are known)."""
    kinds = [name for name in ("prompt", "messages", "prompt_token_ids") if request.HasField(name)]
    spec = request.speculation
    if spec.mode not in gateway_pb2.SpeculationMode.values():
        raise InvalidArgument("speculation.mode", f"unknown value {spec.mode}; use one of "
                              + ", ".join(gateway_pb2.SpeculationMode.keys()))
    s = request.sampling
    return GenerateInput(
        prompt=request.prompt if "prompt" in kinds else None,
        messages=[(m.role, m.content) for m in request.messages.messages] if "messages" in kinds else None,
        prompt_token_ids=list(request.prompt_token_ids.ids) if "prompt_token_ids" in kinds else None,
        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
        seed=s.seed if s.HasField("seed") else None, stop=list(s.stop), ignore_eos=s.ignore_eos,
        slo=Slo(request.slo.ttft_ms, request.slo.tpot_ms, request.slo.deadline_ms, request.slo.best_effort),
        priority=request.priority, mode=_MODE_FROM_PB.get(spec.mode, ""), static_k=spec.static_k,
        request_id=request.request_id)


async def deltas(seq: Sequence, raise_errors: bool = True) -> AsyncIterator[Delta]:
    """The sequence's deltas up to and including the finishing one (or the error, when errors are
    not raised); nothing after a cancellation."""
    while True:
        delta = await seq.out.get()
        if delta.error is not None and raise_errors:
            raise delta.error
        if delta.finish is Finish.CANCELLED:
            return
        yield delta
        if delta.finish is not None or delta.error is not None:
            return


def stats_to_pb(seq: Sequence) -> gateway_pb2.GenerateStats:
    a = attainment(seq)
    return gateway_pb2.GenerateStats(
        prompt_tokens=len(seq.prompt), output_tokens=len(seq.generated), ttft_ms=seq.ttft_ms, tpot_ms=seq.tpot_ms,
        steps=seq.steps, draft_tokens=seq.draft_tokens, accepted_tokens=seq.accepted_tokens,
        slo_attained=a.slo, ttft_attained=a.ttft, tpot_attained=a.tpot, deadline_attained=a.deadline,
        best_effort=seq.unattainable, total_ms=((seq.last_token_at or seq.arrival) - seq.arrival) * 1000,
        speculation=speculation_summary(seq), cached_tokens=seq.cached_tokens)


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
        self.draining = False  # shutting down: new requests are refused, those in flight finish
        self.on_reject: Callable[[str], None] = lambda reason: None  # refusals other than admission's

    def attach(self, scheduler: Scheduler, tokenizer, vocab: int, limits: Limits, info: gateway_pb2.GatewayInfo,
               admission: Admission) -> None:
        self.tokenizer, self.vocab, self.limits = tokenizer, vocab, limits
        self.info, self.admission = info, admission
        self.scheduler = scheduler

    def _ready(self) -> Scheduler:
        if self.scheduler is None:
            raise Unavailable("the gateway is starting; its model services are not ready yet")
        if self.draining:
            raise Unavailable("the gateway is shutting down; send to another replica")
        return self.scheduler

    def open_stream(self, request: GenerateInput, client: str) -> Sequence:
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
            seq = validate(request, self.tokenizer, self.vocab, self.limits)
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
        """The stream is over; a cancelled one (the client went away before its end) frees its
        sessions on both model services. Closing twice is a no-op, so every path that may end a
        stream can close it."""
        if seq.stream_closed:
            return
        seq.stream_closed = True
        if cancelled:
            self.scheduler.cancel(seq)
        self.streams[client] -= 1
        if not self.streams[client]:
            del self.streams[client]

    async def Generate(self, request, context):
        client = _client_id(context)
        try:
            generate = input_from_pb(request)
        except InvalidArgument:
            self.on_reject("invalid_argument")
            raise
        seq = self.open_stream(generate, client)
        cancelled = True
        try:
            async for delta in deltas(seq):
                message = gateway_pb2.GenerateResponse(request_id=seq.request_id or seq.id, token_ids=delta.token_ids, text=delta.text)
                if delta.finish is not None:
                    message.finish_reason = _FINISH_TO_PB[delta.finish]
                    message.stats.CopyFrom(stats_to_pb(seq))
                    yield message
                elif delta.token_ids or delta.text:
                    yield message
            cancelled = False
        finally:
            self.close_stream(seq, client, cancelled)

    async def Info(self, request, context):
        self._ready()
        info = gateway_pb2.GatewayInfo()
        info.CopyFrom(self.info)
        info.drafter_available = self.scheduler.drafter_available
        info.version = __version__
        return info
