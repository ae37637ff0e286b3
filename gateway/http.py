"""The OpenAI-compatible HTTP API, beside gRPC in the gateway process.

Each request body is validated by a typed model, turned into the transport-free `GenerateInput`
and sent through the same path as a gRPC call (`GatewayServicer.open_stream`: limits, validation,
admission, the same scheduler), so both fronts validate alike and a greedy request returns the same
tokens over either.
Extensions in the body, as vLLM accepts its extras: `top_k`, `slo` and `priority`. Errors take
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from gateway.request import GenerateInput
from gateway.sequence import Finish, Sequence
from gateway.sequence import Slo as SequenceSlo
from gateway.servicer import GatewayServicer, deltas
from specserve.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, SpecServeError, Unavailable
from specserve.server import Server, api_key

log = logging.getLogger(__name__)

# gRPC field names as the HTTP body spells them, for error messages and `param`.
_PARAMS = {"sampling.max_new_tokens": "max_tokens", "sampling.temperature": "temperature", "sampling.top_p": "top_p",
           "sampling.top_k": "top_k", "sampling.seed": "seed", "sampling.stop": "stop", "prompt_token_ids": "prompt",
           "input": "prompt"}
OPENAI_DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: a request that sets none is sampled
INT32_END = 2**31  # counts travel as int32 on the way to the model services


class HttpError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def http_error(exc: SpecServeError) -> HttpError:
    """The one mapping from domain errors to HTTP statuses."""
    if isinstance(exc, InvalidArgument):
        param = _PARAMS.get(exc.field, exc.field.removeprefix("sampling."))
        message = str(exc).replace(exc.field, param, 1)
        return HttpError(400, message, "invalid_request_error", param)
    if isinstance(exc, ResourceExhausted):
        retry_s = max(1, math.ceil(exc.retry_after_ms / 1000))
        return HttpError(429, str(exc), "rate_limit_exceeded", headers={"Retry-After": str(retry_s)})
    if isinstance(exc, DeadlineExceeded):
        return HttpError(504, str(exc), "timeout")
    if isinstance(exc, Unavailable):
        return HttpError(503, str(exc), "service_unavailable")
    return HttpError(500, "internal error", "internal_error")


class Slo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttft_ms: int = Field(0, ge=0, lt=2**62)
    tpot_ms: int = Field(0, ge=0, lt=2**62)
    deadline_ms: int = Field(0, ge=0, lt=2**62)
    best_effort: bool = False


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints take. Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=0, lt=INT32_END)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, lt=INT32_END)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    slo: Slo | None = None
    priority: int = Field(0, ge=-2**31, lt=2**31)

    def to_input(self, max_tokens: int | None, **inputs) -> GenerateInput:
        if self.n != 1:
            raise HttpError(400, f"n: only n = 1 is supported, got {self.n}", "invalid_request_error", "n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        slo = SequenceSlo(**self.slo.model_dump()) if self.slo is not None else SequenceSlo()
        return GenerateInput(
            max_new_tokens=max_tokens or 0, top_k=self.top_k or 0, top_p=self.top_p or 0.0, stop=stop,
            temperature=OPENAI_DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            seed=self.seed, slo=slo, priority=self.priority, ignore_eos=self.ignore_eos, **inputs)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]

    def to_request(self) -> GenerateInput:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise HttpError(400, "prompt: one prompt per request", "invalid_request_error", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.to_input(self.max_tokens, prompt=prompt)
        if not prompt:
            raise HttpError(400, "prompt: must not be empty", "invalid_request_error", "prompt")
        return self.to_input(self.max_tokens, prompt_token_ids=list(prompt))


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] = ""


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=0, lt=INT32_END)

    def to_request(self) -> GenerateInput:
        messages = [(m.role, m.content if isinstance(m.content, str) else "".join(p.text for p in m.content))
                    for m in self.messages]
        return self.to_input(self.max_completion_tokens or self.max_tokens, messages=messages)


_FINISH = {Finish.LENGTH: "length", Finish.EOS: "stop", Finish.STOP: "stop"}


def _usage(seq: Sequence) -> dict:
    return {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.generated),
            "total_tokens": len(seq.prompt) + len(seq.generated),
            "prompt_tokens_details": {"cached_tokens": seq.cached_tokens}}


class HttpApi:
    """The FastAPI app over a gateway servicer; `served_model` is the name clients send as `model`."""

    def __init__(self, servicer: GatewayServicer, server: Server, registry: CollectorRegistry, keys: set[str],
                 served_model_name: str = "", max_body_bytes: int = 4 << 20):
        self.servicer, self.server, self.keys, self.served_model_name = servicer, server, keys, served_model_name
        self.app = FastAPI(title="SpecServe", docs_url=None, redoc_url=None)
        self.app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
        self.app.add_exception_handler(HttpError, lambda request, exc: exc.response())
        self.app.add_exception_handler(SpecServeError, lambda request, exc: http_error(exc).response())
        self.app.add_exception_handler(RequestValidationError, self._invalid_body)
        self.app.add_exception_handler(Exception, self._internal)
        self.app.post("/v1/completions")(self.completions)
        self.app.post("/v1/chat/completions")(self.chat_completions)
        self.app.get("/v1/models")(self.models)
        self.app.get("/health")(self.health)
        self.registry = registry
        self.app.get("/metrics")(self.metrics)

    @staticmethod
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error in %s", request.url.path)
        return HttpError(500, "internal error", "internal_error").response()

    @staticmethod
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid body"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or "body"
        return HttpError(400, f"{param}: {first.get('msg', 'invalid value')}", "invalid_request_error", param).response()

    @property
    def served_model(self) -> str:
        info = self.servicer.info
        if self.served_model_name or info is None:
            return self.served_model_name
        return info.target_model.rstrip("/").rsplit("/", 1)[-1]

    def _authenticate(self, request: Request) -> str:
        """The client's id (its key, else its address) once its key checks out."""
        key = api_key(request.headers.items())
        if self.keys and key not in self.keys:
            raise HttpError(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error",
                            code="invalid_api_key")
        self.servicer._ready()
        return key or (request.client.host if request.client else "")

    def _check(self, request: Request, model: str) -> str:
        """Authenticate and check the model; return the client's id."""
        client = self._authenticate(request)
        if model not in (self.served_model, self.servicer.info.target_model):
            raise HttpError(404, f"model: {model!r} is not served here; this server serves {self.served_model!r}",
                            "invalid_request_error", "model", "model_not_found")
        return client

    async def models(self, request: Request) -> dict:
        self._authenticate(request)
        info = self.servicer.info
        return {"object": "list", "data": [{
            "id": self.served_model, "object": "model", "created": 0, "owned_by": "specserve",
            "root": info.target_model, "metadata": {"draft_model": info.draft_model, "max_context": info.max_context}}]}

    async def metrics(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def health(self) -> JSONResponse:
        ok = self.server.serving and self.servicer.scheduler is not None
        status = "ok" if ok else "draining" if self.servicer.draining else \
            "starting" if self.servicer.scheduler is None else "unavailable"
        return JSONResponse({"status": status}, status_code=200 if ok else 503)

    async def completions(self, body: CompletionRequest, request: Request):
        return await self._serve(request, body, chat=False)

    async def chat_completions(self, body: ChatRequest, request: Request):
        return await self._serve(request, body, chat=True)

    async def _serve(self, request: Request, body: CompletionRequest | ChatRequest, chat: bool):
        client = self._check(request, body.model)
        seq = self.servicer.open_stream(body.to_request(), client)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{seq.id}", "created": int(time.time()),
                "model": self.served_model}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _ClosingStream(self._events(seq, client, meta, chat, usage),
                                  lambda: self.servicer.close_stream(seq, client, cancelled=True))
        cancelled = True
        try:
            text, finish = "", None
            async for delta in deltas(seq):
                text += delta.text
                finish = delta.finish
            cancelled = False
        finally:
            self.servicer.close_stream(seq, client, cancelled)
        if finish is Finish.DEADLINE:
            raise http_error(DeadlineExceeded(f"the request passed its deadline after {len(seq.generated)} tokens"))
        choice: dict[str, Any] = {"index": 0, "finish_reason": _FINISH.get(finish, "stop"), "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": _usage(seq)}

    async def _events(self, seq: Sequence, client: str, meta: dict, chat: bool, usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per emitted group of tokens, the finish reason on the last,
        then the usage chunk when asked for, then [DONE]. A client that goes away cancels the session."""
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return _sse({**meta, "object": kind, "choices": [choice]})

        cancelled = True
        try:
            first = True
            async for delta in deltas(seq, raise_errors=False):
                if delta.error is not None or delta.finish is Finish.DEADLINE:
                    err = delta.error if delta.error is not None else DeadlineExceeded("the request passed its deadline")
                    e = http_error(err)
                    yield _sse({"error": {"message": e.message, "type": e.type, "param": None, "code": e.status}})
                    break
                finish = _FINISH.get(delta.finish) if delta.finish is not None else None
                if delta.text or finish or first:
                    yield chunk(delta.text, finish, first and chat)
                    first = False
            else:
                if usage:
                    yield _sse({**meta, "object": kind, "choices": [], "usage": _usage(seq)})
            yield "data: [DONE]\n\n"
            cancelled = False
        finally:
            self.servicer.close_stream(seq, client, cancelled)


def _sse(doc: dict) -> str:
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"


class _ClosingStream(StreamingResponse):
    """Server-sent events whose stream is closed however the response ends: a client gone before
    the first byte means the body generator never starts, so its own `finally` never runs."""

    def __init__(self, events: AsyncIterator[str], close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream")
        self.close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.close()  # a no-op when the events closed the stream themselves


class BodyLimit:
    """ASGI middleware: a request body past `max_bytes` (declared or streamed) gets 413 before any
    handler reads it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._too_large(send)

    async def _too_large(self, send) -> None:
        doc = {"error": {"message": f"the request body exceeds {self.max_bytes} bytes",
                         "type": "invalid_request_error", "param": None, "code": None}}
        body = json.dumps(doc).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    """A streamed body passed the limit."""


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the gateway's event loop: the gateway owns the signals and the shutdown."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; no port sharing (a port with a listener fails here, naming it), but
    address reuse, so a restart right after a stop binds despite connections in TIME_WAIT."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"error: cannot bind the HTTP port {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def http_server(api: HttpApi, tls_cert: str = "", tls_key: str = "") -> _EmbeddedServer:
    """The HTTP server over the API; its owner runs `serve(sockets=...)` as a task."""
    config = uvicorn.Config(api.app, log_level="warning", access_log=False, lifespan="off", ssl_certfile=tls_cert or None,
                            ssl_keyfile=tls_key or None, timeout_graceful_shutdown=5)
    return _EmbeddedServer(config)
