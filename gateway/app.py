"""The gateway process: its configuration, and the app that binds both fronts, connects to the model services and runs the scheduler."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import redis.asyncio
from prometheus_client import start_http_server

from gateway import http
from gateway.admission import ADMISSION_MODES, Admission
from gateway.backends.grpc import connect_drafter, connect_verifier
from gateway.metrics import GatewayMetrics
from gateway.request import Limits
from gateway.scheduler import Scheduler, SchedulerConfig
from gateway.servicer import GatewayServicer
from specserve.background import Tasks
from specserve.config import doc
from specserve.contracts import MAX_PLAIN_STEPS
from specserve.errors import FailedPrecondition, InvalidArgument, SpecServeError
from specserve.live import LiveConfig, LiveReader
from specserve.server import ApiKeyInterceptor, Server, run_until_signalled
from specserve.strategy import MODES, Strategy
from specserve.telemetry import TelemetryEmitter
from specserve.tokenizer import fingerprint as fingerprint_of
from specserve.tokenizer import load_tokenizer
from specserve.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger("specserve.gateway")

VERIFIER_CHECK_S = 1.0  # how often readiness asks the verifier (each ask may take this long)
VERIFIER_MISSES = 2  # asks in a row without an answer before the gateway reports NOT_SERVING
NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


@dataclass
class GatewayConfig:
    """The client-facing gateway."""

    tokenizer: str = doc("", "tokenizer folder or id (the target model's)")
    verifier: str = doc("127.0.0.1:50052", "verifier address")
    drafter: str = doc("", "drafter address; empty runs without speculation")
    host: str = doc("0.0.0.0", "interface to bind")
    port: int = doc(50051, "port to bind; 0 picks a free one")
    http_port: int = doc(8000, "OpenAI-compatible HTTP API port (also serves /metrics and /health); "
                               "0 picks a free one, -1 disables")
    served_model_name: str = doc("", "the model name HTTP clients send; empty uses the target model's folder name")
    metrics_port: int = doc(0, "Prometheus /metrics port; 0 disables")
    redis_url: str = doc("", "Redis for telemetry, strategy and ops keys; empty disables them")
    mode: str = doc("adaptive", "speculation mode used until a policy publishes a strategy")
    static_k: int = doc(4, "draft tokens per step in static mode")
    max_draft_tokens: int = doc(8, "longest draft per step")
    max_free_draft_tokens: int = doc(64, "longest draft per step from a free drafter (suffix lookup, no model)")
    max_batch_size: int = doc(16, "most sessions decoded together")
    max_queued: int = doc(256, "most requests waiting for a batch slot")
    max_prefill_tokens: int = doc(2048, "prompt tokens prefilled per step")
    max_plain_steps: int = doc(SchedulerConfig.max_plain_steps, "plain decoding with no request waiting: tokens per "
                               "session per verify call (a decode burst); 1 turns bursts off")
    max_burst_ms: float = doc(SchedulerConfig.max_burst_ms, "a decode burst's longest predicted time (what a request "
                              "arriving meanwhile may wait)")
    linger_ms: float = doc(SchedulerConfig.linger_ms, "after a step that ended requests, how long the next step "
                           "waits for as many new ones (a closed-loop client's next request joins it)")
    max_new_tokens: int = doc(2048, "largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = doc(128, "max_new_tokens when a request leaves it 0")
    default_ttft_ms: float = doc(0.0, "TTFT SLO of requests that set none; 0 is none")
    default_tpot_ms: float = doc(0.0, "TPOT SLO of requests that set none; 0 is none")
    admission: str = doc("reject", "reject, best_effort or off")
    admission_margin: float = doc(1.0, "admit only if predicted TTFT times this fits the TTFT SLO")
    call_timeout_s: float = doc(SchedulerConfig.call_timeout_s, "cap on every downstream call")
    startup_timeout_s: float = doc(600.0, "how long to wait for the verifier at start")
    grace_s: float = doc(10.0, "drain time on SIGTERM")
    instance: str = doc("", "this gateway's name in telemetry and on the model services, where it owns its "
                            "sessions (a restart frees those its earlier run left); empty uses hostname:port")
    api_keys: str = doc("", "comma-separated API keys; when set, Generate and Info require one")
    tls_cert: str = doc("", "PEM certificate chain; with tls_key, serve TLS only")
    tls_key: str = doc("", "PEM private key for tls_cert")
    max_prompt_tokens: int = doc(0, "longest prompt accepted; 0 is the context window")
    max_streams_per_client: int = doc(64, "concurrent Generate streams per API key (or peer address)")
    max_request_bytes: int = doc(4 << 20, "largest request accepted (gRPC message or HTTP body)")

    def validate(self) -> None:
        if not self.tokenizer:
            raise InvalidArgument("tokenizer", "a tokenizer folder or id is required")
        if self.mode not in MODES:
            raise InvalidArgument("mode", f"must be one of {', '.join(MODES)}")
        if self.admission not in ADMISSION_MODES:
            raise InvalidArgument("admission", f"must be one of {', '.join(ADMISSION_MODES)}")
        if self.max_batch_size < 1:
            raise InvalidArgument("max_batch_size", "must be >= 1")
        if not 1 <= self.max_plain_steps <= MAX_PLAIN_STEPS:
            raise InvalidArgument("max_plain_steps", f"must be in [1, {MAX_PLAIN_STEPS}], got {self.max_plain_steps}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgument("tls_cert", "tls_cert and tls_key go together")


async def wait_for(backend, name: str, timeout_s: float):
    """Poll Info until the service answers (it reports UNAVAILABLE while loading)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await backend.info(timeout=5.0)
        except SpecServeError as exc:
            if time.monotonic() > deadline:
                raise FailedPrecondition(f"{name} did not become ready in {timeout_s:.0f}s: {exc}") from None
            await asyncio.sleep(0.5)


class Gateway:
    """The gateway process: its fronts (gRPC, HTTP), and, once the model services answer, the
    scheduler with admission, metrics, telemetry and the live strategy."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.fingerprint = fingerprint_of(self.tokenizer)
        self.verifier = connect_verifier(config.verifier)
        self.drafter = connect_drafter(config.drafter) if config.drafter else None
        self.keys = {k.strip() for k in config.api_keys.split(",") if k.strip()}
        self.metrics = GatewayMetrics()
        self.redis = redis.asyncio.Redis.from_url(config.redis_url, socket_timeout=2, socket_connect_timeout=2) \
            if config.redis_url else None
        self.strategy = Strategy(mode=config.mode, static_k=config.static_k, max_draft_tokens=config.max_draft_tokens,
                                 max_free_draft_tokens=config.max_free_draft_tokens)
        self.servicer = GatewayServicer()
        self.server = Server([NAME], options=[("grpc.max_receive_message_length", config.max_request_bytes)],
                             interceptors=[ApiKeyInterceptor(self.keys, f"/{NAME}/")] if self.keys else None)
        gateway_pb2_grpc.add_GatewayServicer_to_server(self.servicer, self.server.grpc)
        self.scheduler: Scheduler | None = None
        self.background: list = []  # telemetry emitter and live reader, stopped last
        self.tasks = Tasks()  # the HTTP server
        self.http_server = None

    def bind(self) -> None:
        """Bind every port first: a busy one is a start-up error naming it."""
        c = self.config
        credentials = None
        if c.tls_cert:
            credentials = grpc.ssl_server_credentials([(Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes())])
        self.port = self.server.bind(f"{c.host}:{c.port}", credentials)
        print(f"gateway listening on {c.host}:{self.port}", flush=True)
        self.http_sock = http.bind(c.host, c.http_port) if c.http_port >= 0 else None
        if self.http_sock is not None:
            print(f"gateway HTTP (OpenAI API) listening on {c.host}:{self.http_sock.getsockname()[1]}", flush=True)
        if c.metrics_port:
            start_http_server(c.metrics_port, registry=self.metrics.registry)

    async def check_pair(self):
        """Wait for the model services; the tokenizer, the verifier's and the drafter's must agree."""
        c = self.config
        vinfo = await wait_for(self.verifier, "verifier", c.startup_timeout_s)
        if vinfo.tokenizer_fingerprint != self.fingerprint:
            raise FailedPrecondition(f"tokenizer {c.tokenizer} does not match the verifier's model {vinfo.model_id}")
        dinfo = None
        if self.drafter is not None:
            dinfo = await wait_for(self.drafter, "drafter", c.startup_timeout_s)
            if dinfo.tokenizer_fingerprint != vinfo.tokenizer_fingerprint:
                raise FailedPrecondition(
                    f"drafter model {dinfo.model_id} and verifier model {vinfo.model_id} use different tokenizers "
                    f"({dinfo.tokenizer_fingerprint} != {vinfo.tokenizer_fingerprint})")
        return vinfo, dinfo

    async def warm_up(self) -> None:
        c, metrics = self.config, self.metrics
        vinfo, dinfo = await self.check_pair()
        owner = c.instance or f"{socket.gethostname()}:{self.port}"
        await self.release_earlier_sessions(owner)
        telemetry = TelemetryEmitter(self.redis, "gateway", owner) if self.redis else None

        def on_step(record) -> None:
            metrics.observe_step(record)
            if telemetry:
                telemetry.emit(record)

        scheduler = Scheduler(self.verifier, self.drafter, self.tokenizer, vinfo.eos_token_ids,
                              SchedulerConfig(c.max_batch_size, c.max_queued, c.max_prefill_tokens, c.call_timeout_s,
                                              max_plain_steps=c.max_plain_steps, max_burst_ms=c.max_burst_ms,
                                              linger_ms=c.linger_ms),
                              self.strategy, on_step=on_step, draft_free=bool(dinfo and dinfo.free_drafts),
                              hybrid=bool(dinfo and dinfo.hybrid))
        admission = Admission(scheduler, c.admission, on_reject=lambda seq: metrics.rejected.labels("slo").inc(),
                              margin=c.admission_margin, on_admit=lambda seq: metrics.admitted.inc())

        def on_finish(seq) -> None:
            metrics.observe_finish(seq)
            admission.observe(seq)

        scheduler.on_finish = on_finish
        limits = Limits(vinfo.max_context, c.max_new_tokens, c.default_max_new_tokens, c.max_prompt_tokens,
                        default_ttft_ms=c.default_ttft_ms, default_tpot_ms=c.default_tpot_ms,
                        max_streams_per_client=c.max_streams_per_client, session_prefix=owner + "/")
        if telemetry is not None:
            telemetry.start()
            self.background.append(telemetry)
            await self.follow_live(scheduler, limits, admission)
        info = gateway_pb2.GatewayInfo(
            target_model=vinfo.model_id, draft_model=dinfo.model_id if dinfo else "",
            tokenizer_fingerprint=self.fingerprint, max_context=vinfo.max_context, max_new_tokens=c.max_new_tokens,
            default_max_new_tokens=c.default_max_new_tokens, max_batch_size=c.max_batch_size, max_queued=c.max_queued)
        metrics.follow(scheduler, telemetry, admission)
        self.servicer.on_reject = lambda reason: metrics.rejected.labels(reason).inc()
        self.servicer.attach(scheduler, self.tokenizer, len(self.tokenizer), limits, info, admission)
        scheduler.start()
        self.tasks.spawn(self._watch_verifier(vinfo.instance_id), "watch-verifier")
        self.scheduler = scheduler

    async def release_earlier_sessions(self, owner: str) -> None:
        """Free the sessions an earlier run of this gateway left on the model services (it crashed:
        they would hold KV and sequences until their TTL)."""
        for name, backend in (("verifier", self.verifier), ("drafter", self.drafter)):
            if backend is None:
                continue
            try:
                released = await backend.release([], timeout=self.config.call_timeout_s, owner=owner)
            except SpecServeError as exc:
                log.warning("could not free earlier sessions on the %s: %s", name, exc)
                continue
            if released:
                log.warning("freed %d sessions an earlier run of this gateway left on the %s", released, name)

    async def follow_live(self, scheduler: Scheduler, limits: Limits, admission: Admission) -> None:
        """The published strategy and the ops keys, applied as they change."""
        c = self.config

        def on_change(live: LiveConfig) -> None:
            scheduler.planner.set_strategy(live.strategy())
            scheduler.config.max_batch_size = live.ops.get("max_batch_size", c.max_batch_size)
            scheduler.config.max_plain_steps = live.ops.get("max_plain_steps", c.max_plain_steps)
            scheduler.config.linger_ms = live.ops.get("linger_ms", c.linger_ms)
            limits.default_ttft_ms = live.ops.get("default_ttft_ms", c.default_ttft_ms)
            limits.default_tpot_ms = live.ops.get("default_tpot_ms", c.default_tpot_ms)
            admission.mode = live.ops.get("admission", c.admission)
            self.metrics.observe_invalid(live.invalid_ops, live.invalid_strategies)

        reader = LiveReader(self.redis, LiveConfig(self.strategy), on_change)
        await reader.refresh_safely()
        reader.start()
        self.background.append(reader)

    async def stop(self) -> None:
        if self.http_server is not None:
            self.http_server.should_exit = True
        if self.scheduler is not None:
            await self.scheduler.stop()
        for task in self.background:
            await task.stop()
        await self.tasks.stop()
        if self.redis is not None:
            await self.redis.aclose()

    async def serve(self) -> None:
        self.bind()
        if self.http_sock is not None:
            api = http.HttpApi(self.servicer, self.server, self.metrics.registry, self.keys, self.config.served_model_name,
                               self.config.max_request_bytes)
            self.http_server = http.http_server(api, self.config.tls_cert, self.config.tls_key)
            self.tasks.spawn(self.http_server.serve(sockets=[self.http_sock]), "http-server")
        await run_until_signalled(self.server, self.warm_up, self.config.grace_s, on_stop=self.stop, drain=self.drain)

    async def _watch_verifier(self, instance: str) -> None:
        """Readiness follows the verifier: health (gRPC and /health) turns NOT_SERVING within a
        few seconds of the verifier going away, so a load balancer stops sending doomed traffic,
        and SERVING again when it answers. A verifier that answers as a new instance restarted
        with an empty prefix cache: the scheduler stops pricing prompts as cached there."""
        misses = 0
        while True:
            await asyncio.sleep(VERIFIER_CHECK_S)
            try:
                info = await self.verifier.info(timeout=VERIFIER_CHECK_S)
                misses = 0
                if info.instance_id != instance:
                    log.warning("verifier restarted (instance %s): its prefix cache is empty", info.instance_id)
                    instance = info.instance_id
                    self.scheduler.prefixes.forget()
            except SpecServeError as exc:
                misses += 1
                log.debug("verifier check failed (%d in a row): %s", misses, exc)
            ready = misses < VERIFIER_MISSES and not self.servicer.draining
            if ready != self.server.serving and not self.servicer.draining:
                log.warning("verifier %s: health %s", "answers again" if ready else "is away",
                            "SERVING" if ready else "NOT_SERVING")
                await self.server.set_serving(ready)

    async def drain(self) -> None:
        """Refuse new requests on both fronts; return once every request in flight has finished
        (gRPC and HTTP streams alike)."""
        self.servicer.draining = True
        if self.scheduler is not None:
            await self.scheduler.idle.wait()


async def serve(config: GatewayConfig) -> None:
    """Run a gateway until signalled (its gRPC server belongs to this event loop)."""
    await Gateway(config).serve()
