"""The servicer base of the drafter and the verifier, and the serve loop both run: bind, load,
warm and profile, serve until signalled, drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from services.modelservice import profiles
from services.modelservice.compute import ComputeThread
from services.modelservice.config import ModelServiceConfig
from services.modelservice.loading import LoadedModel, load
from specserve.background import Tasks
from specserve.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)


def unique_ids(ids: list[str], field: str) -> None:
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
        if self.worker is None:
            raise Unavailable(f"{self.model_id} is still loading")
        return self.worker

    async def Info(self, request, context):
        from specserve import __version__, codec

        worker = self.ready()
        info = self.loaded.info(self.model_id, len(worker.sessions), getattr(worker, "kv_tokens", 0))
        info.free_drafts = getattr(worker, "free", False)
        info.hybrid = getattr(worker, "hybrid", False)
        return codec.info_to_pb(info, __version__)

    async def Release(self, request, context):
        from specserve.v1 import common_pb2

        worker = self.ready()

        def release() -> int:
            return worker.release([*request.session_ids, *worker.sessions.owned_by(request.owner)])

        released = await self.compute.run(release)
        return common_pb2.ReleaseResponse(released=released)


async def serve_model(config: ModelServiceConfig, name: str, servicer: ModelServicer,
                      add_to_server: Callable[[Any, Any], None], build: Callable[[LoadedModel], Any],
                      warm: Callable[[Any], None], profile: Callable[[Any], list[dict]],
                      profile_version: str) -> None:
    """Bind, load the model (health NOT_SERVING meanwhile), warm and profile it, serve until
    signalled, drain. The profile records go to telemetry, where the policy seeds its cost model.

    `build(loaded)` makes the worker. Then, on the compute thread, `warm(worker)` runs at every
    start, so the first request never pays lazy initialisation; the records come from the profile
    cache (`config.profile_cache`, see services.modelservice.profiles), or on a miss or with
    `config.reprofile` from `profile(worker)`, and are then cached. `profile_version` changes
    whenever what `profile` measures changes, so entries cached by older code are not reused.
    """
    from specserve.server import Server, run_until_signalled

    server = Server([name])
    add_to_server(servicer, server.grpc)
    port = server.bind(f"{config.host}:{config.port}")
    print(f"{name} listening on {config.host}:{port}", flush=True)
    tasks, client = Tasks(), None
    component = name.rsplit(".", 1)[-1].lower()
    if config.redis_url:
        import redis.asyncio

        from specserve.telemetry import TelemetryEmitter

        client = redis.asyncio.Redis.from_url(config.redis_url, socket_timeout=2, socket_connect_timeout=2)
        servicer.telemetry = TelemetryEmitter(client, component, config.instance or f"{config.host}:{port}")

    def warm_and_profile(worker: Any) -> list[dict]:
        warm(worker)
        # The cache's file reads and writes run here on the compute thread too: it has nothing
        # else to do before the worker is attached, and the profile must run on it.
        return profiles.cached_profile(config, name, profile_version, lambda: profile(worker), component)

    async def warm_up() -> None:
        loaded = await asyncio.to_thread(load, config)
        worker = build(loaded)
        records = await servicer.compute.run(warm_and_profile, worker)
        servicer.attach(worker, loaded)
        for record in records if servicer.telemetry is not None else []:
            servicer.telemetry.emit(record)
        # A worker with sessions in two tables (the hybrid drafter) evicts from both.
        evict = getattr(worker, "evict_idle", None) or (lambda: worker.sessions.evict_idle())
        tasks.spawn(_evict_forever(servicer.compute, evict), "evict-idle-sessions")
        if servicer.telemetry is not None:
            servicer.telemetry.start()

    async def stop() -> None:
        await tasks.stop()
        await asyncio.to_thread(servicer.compute.shutdown)
        if servicer.telemetry is not None:
            await servicer.telemetry.stop()
        if client is not None:
            await client.aclose()

    await run_until_signalled(server, warm_up, config.grace_s, on_stop=stop)


EVICT_EVERY_S = 30.0  # idle sessions live their TTL plus at most this long


async def _evict_forever(compute: ComputeThread, evict_idle: Callable[[], int], every_s: float = EVICT_EVERY_S) -> None:
    while True:
        await asyncio.sleep(every_s)
        evicted = await compute.run(evict_idle)
        if evicted:
            log.info("evicted %d idle sessions", evicted)
