"""What the drafter and the verifier services share: configuration, model loading, and running
model compute on one worker thread off the event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from specserve import runtime
from specserve.compute import ComputeThread
from specserve.config import doc
from specserve.contracts import WorkerInfo
from specserve.errors import InvalidArgument
from specserve.runtime import Runtime
from specserve.tokenizer import fingerprint, load_tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ModelServiceConfig:
    """A model service (drafter or verifier)."""

    model: str = doc("", "model folder or Hugging Face id")
    host: str = doc("127.0.0.1", "interface to bind; keep model services on a private interface")
    port: int = doc(0, "port to bind; 0 picks a free one")
    runtime: str = doc("auto", "auto, torch or llama.cpp; auto picks llama.cpp for a GGUF model off CUDA")
    device: str = doc("cpu", "torch device, e.g. cpu or cuda:0 (the llama.cpp runtime runs on the CPU)")
    dtype: str = doc("auto", "torch runtime: auto, float32, bfloat16 or float16")
    max_context: int = doc(0, "longest sequence served; 0 takes the model's own limit")
    session_ttl_s: float = doc(600.0, "evict sessions idle this long")
    threads: int = doc(0, "CPU threads for model compute; 0 keeps the runtime's default (all cores)")
    max_sessions: int = doc(64, "llama.cpp runtime: sessions held at once (one sequence id each)")
    kv_tokens: int = doc(16384, "llama.cpp runtime: KV positions over all sessions")
    kv_unified: bool = doc(True, "llama.cpp runtime: one KV buffer shared by all sequences (cheaper mixed batches)")
    redis_url: str = doc("", "Redis for telemetry and strategy; empty disables both")
    proposer: str = doc("draft_model", "drafter only: draft_model or ngram")
    step_delay_ms: float = doc(0.0, "artificial delay added to every forward call (load tests only)")
    grace_s: float = doc(10.0, "drain time on SIGTERM")
    instance: str = doc("", "instance name in telemetry; empty uses host:port")

    def validate(self) -> None:
        if not self.model:
            raise InvalidArgument("model", "a model folder or id is required")
        if not 0 <= self.port < 65536:
            raise InvalidArgument("port", f"must be in [0, 65535], got {self.port}")
        runtime.choose(self.runtime, self.model or ".", self.device)
        if self.proposer not in ("draft_model", "ngram"):
            raise InvalidArgument("proposer", f"must be draft_model or ngram, got {self.proposer!r}")


@dataclass
class LoadedModel:
    runtime: Runtime
    fingerprint: str
    eos_token_ids: list[int]

    def info(self, model_id: str, sessions: int, kv_tokens: int) -> WorkerInfo:
        ri = self.runtime.info
        return WorkerInfo(model_id, self.fingerprint, self.runtime.max_context, ri.device, ri.dtype,
                          self.eos_token_ids, sessions, kv_tokens, ri.runtime, ri.model_file)


def load(config: ModelServiceConfig) -> LoadedModel:
    """Open the model on the configured runtime, with its tokenizer's fingerprint and stop ids."""
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.monotonic()
    rt = runtime.open_runtime(config.model, config.runtime, config.device, config.dtype, config.max_context,
                              config.threads, config.max_sessions, config.kv_tokens, config.kv_unified)
    tokenizer = load_tokenizer(config.model)
    eos = list(rt.info.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    log.info("loaded %s on the %s runtime (%s, %s) in %.1fs", rt.info.model_file, rt.info.runtime, rt.info.device,
             rt.info.dtype, time.monotonic() - started)
    print(f"model {rt.info.model_file}: runtime {rt.info.runtime}, {rt.info.dtype} on {rt.info.device}", flush=True)
    return LoadedModel(rt, fingerprint(tokenizer), eos)


def unique_ids(ids: list[str], field: str) -> None:
    from specserve.errors import InvalidArgument

    if any(not i for i in ids):
        raise InvalidArgument(field, "session_id must not be empty")
    if len(set(ids)) != len(ids):
        raise InvalidArgument(field, "a session appears twice in one batch")


class ModelServicer:
    """Base of the drafter and verifier servicers: registered before start, usable once attached;
    Info and Release are the same for both."""

    def __init__(self, model_id: str, compute: ComputeThread):
        self.model_id, self.compute = model_id, compute
        self.worker: Any = None
        self.loaded: LoadedModel | None = None
        self.telemetry: Any = None  # a TelemetryEmitter when Redis is configured
        self.steps = 0

    def record(self, call: str, batch: int, **fields: Any) -> None:
        """One telemetry record per model call (raw counts and times), never blocking."""
        self.steps += 1
        if self.telemetry is not None:
            self.telemetry.emit({"call": call, "step_id": self.steps, "batch_size": batch,
                                 "sessions": len(self.worker.sessions), "kv_tokens": getattr(self.worker, "kv_tokens", 0),
                                 **fields})

    def attach(self, worker: Any, loaded: LoadedModel) -> None:
        self.worker, self.loaded = worker, loaded

    def ready(self) -> Any:
        from specserve.errors import Unavailable

        if self.worker is None:
            raise Unavailable(f"{self.model_id} is still loading")
        return self.worker

    async def Info(self, request, context):
        from specserve import __version__, codec

        worker = self.ready()
        info = self.loaded.info(self.model_id, len(worker.sessions), getattr(worker, "kv_tokens", 0))
        return codec.info_to_pb(info, __version__)

    async def Release(self, request, context):
        from specserve.v1 import common_pb2

        released = await self.compute.run(self.ready().release, list(request.session_ids))
        return common_pb2.ReleaseResponse(released=released)


async def serve_model(config: ModelServiceConfig, name: str, servicer: ModelServicer,
                      add_to_server: Callable[[Any, Any], None],
                      build: Callable[[LoadedModel], Any], warm: Callable[[Any], list[dict]]) -> None:
    """Bind, load the model (health NOT_SERVING meanwhile), warm and profile it, serve until
    signalled, drain. The profile records go to telemetry, where the policy seeds its cost model."""
    from specserve.server import Server, run_until_signalled

    server = Server([name])
    add_to_server(servicer, server.grpc)
    port = server.bind(f"{config.host}:{config.port}")
    print(f"{name} listening on {config.host}:{port}", flush=True)
    if config.redis_url:
        import redis.asyncio

        from specserve.telemetry import TelemetryEmitter

        client = redis.asyncio.Redis.from_url(config.redis_url, socket_timeout=2, socket_connect_timeout=2)
        component = name.rsplit(".", 1)[-1].lower()
        servicer.telemetry = TelemetryEmitter(client, component, config.instance or f"{config.host}:{port}")

    async def warm_up() -> None:
        loaded = await asyncio.to_thread(load, config)
        worker = build(loaded)
        profile = await servicer.compute.run(warm, worker)
        servicer.attach(worker, loaded)
        for record in profile if servicer.telemetry is not None else []:
            servicer.telemetry.emit(record)
        asyncio.create_task(_evict_forever(servicer.compute, worker.sessions))
        if servicer.telemetry is not None:
            servicer.telemetry.start()

    async def stop() -> None:
        await asyncio.to_thread(servicer.compute.shutdown)
        if servicer.telemetry is not None:
            await servicer.telemetry.stop()

    await run_until_signalled(server, warm_up, config.grace_s, on_stop=stop)


async def _evict_forever(compute: ComputeThread, sessions: Any, every_s: float = 30.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        evicted = await compute.run(sessions.evict_idle)
        if evicted:
            log.info("evicted %d idle sessions", evicted)
