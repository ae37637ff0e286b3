"""Run the gateway: python -m gateway --tokenizer PATH --verifier HOST:PORT [--drafter HOST:PORT]."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass

from pathlib import Path

import grpc
import redis.asyncio
from prometheus_client import start_http_server

from gateway import http
from gateway.admission import ADMISSION_MODES, Admission
from gateway.backends import connect_drafter, connect_verifier
from gateway.metrics import GatewayMetrics
from gateway.scheduler import Scheduler, SchedulerConfig
from gateway.servicer import GatewayServicer, Limits
from specserve import config as cfg
from specserve.tokenizer import fingerprint as fingerprint_of
from specserve.tokenizer import load_tokenizer
from specserve.config import doc
from specserve.errors import FailedPrecondition, InvalidArgument, SpecServeError
from specserve.live import LiveConfig, LiveReader
from specserve.server import ApiKeyInterceptor, Server, run_until_signalled
from specserve.telemetry import TelemetryEmitter
from specserve.strategy import MODES, Strategy
from specserve.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger("specserve.gateway")
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
    max_batch_size: int = doc(16, "most sessions decoded together")
    max_queued: int = doc(256, "most requests waiting for a batch slot")
    max_prefill_tokens: int = doc(2048, "prompt tokens prefilled per step")
    max_new_tokens: int = doc(2048, "largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = doc(128, "max_new_tokens when a request leaves it 0")
    default_ttft_ms: float = doc(0.0, "TTFT SLO of requests that set none; 0 is none")
    default_tpot_ms: float = doc(0.0, "TPOT SLO of requests that set none; 0 is none")
    admission: str = doc("reject", "reject, best_effort or off")
    admission_margin: float = doc(1.25, "admit only if predicted TTFT times this fits the TTFT SLO")
    call_timeout_s: float = doc(120.0, "cap on every downstream call")
    startup_timeout_s: float = doc(600.0, "how long to wait for the verifier at start")
    grace_s: float = doc(10.0, "drain time on SIGTERM")
    api_keys: str = doc("", "comma-separated API keys; when set, Generate and Info require one")
    tls_cert: str = doc("", "PEM certificate chain; with tls_key, serve TLS only")
    tls_key: str = doc("", "PEM private key for tls_cert")
    max_prompt_tokens: int = doc(0, "longest prompt accepted; 0 is the context window")
    max_streams_per_client: int = doc(64, "concurrent Generate streams per API key (or peer address)")
    max_request_bytes: int = doc(4 << 20, "largest request message accepted")

    def validate(self) -> None:
        if not self.tokenizer:
            raise InvalidArgument("tokenizer", "a tokenizer folder or id is required")
        if self.mode not in MODES:
            raise InvalidArgument("mode", f"must be one of {', '.join(MODES)}")
        if self.admission not in ADMISSION_MODES:
            raise InvalidArgument("admission", f"must be one of {', '.join(ADMISSION_MODES)}")
        if self.max_batch_size < 1:
            raise InvalidArgument("max_batch_size", "must be >= 1")
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


async def serve(config: GatewayConfig) -> None:
    tokenizer = load_tokenizer(config.tokenizer)
    fingerprint = fingerprint_of(tokenizer)
    verifier = connect_verifier(config.verifier)
    drafter = connect_drafter(config.drafter) if config.drafter else None
    keys = {k.strip() for k in config.api_keys.split(",") if k.strip()}
    server = Server([NAME], options=[("grpc.max_receive_message_length", config.max_request_bytes)],
                    interceptors=[ApiKeyInterceptor(keys, f"/{NAME}/")] if keys else None)
    credentials = None
    if config.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
    port = server.bind(f"{config.host}:{config.port}", credentials)
    print(f"gateway listening on {config.host}:{port}", flush=True)
    http_sock = http.bind(config.host, config.http_port) if config.http_port >= 0 else None
    if http_sock is not None:
        print(f"gateway HTTP (OpenAI API) listening on {config.host}:{http_sock.getsockname()[1]}", flush=True)
    metrics = GatewayMetrics()
    redis_client = redis.asyncio.Redis.from_url(config.redis_url, socket_timeout=2, socket_connect_timeout=2) \
        if config.redis_url else None
    if config.metrics_port:
        start_http_server(config.metrics_port, registry=metrics.registry)
    strategy = Strategy(mode=config.mode, static_k=config.static_k, max_draft_tokens=config.max_draft_tokens)
    scheduler_config = SchedulerConfig(config.max_batch_size, config.max_queued, config.max_prefill_tokens,
                                       config.call_timeout_s)
    state: dict = {}

    async def warm_up() -> None:
        vinfo = await wait_for(verifier, "verifier", config.startup_timeout_s)
        if vinfo.tokenizer_fingerprint != fingerprint:
            raise FailedPrecondition(f"tokenizer {config.tokenizer} does not match the verifier's model {vinfo.model_id}")
        dinfo = None
        if drafter is not None:
            dinfo = await wait_for(drafter, "drafter", config.startup_timeout_s)
            if dinfo.tokenizer_fingerprint != vinfo.tokenizer_fingerprint:
                raise FailedPrecondition(
                    f"drafter model {dinfo.model_id} and verifier model {vinfo.model_id} use different tokenizers "
                    f"({dinfo.tokenizer_fingerprint} != {vinfo.tokenizer_fingerprint})")
        telemetry = TelemetryEmitter(redis_client, "gateway", f"{config.host}:{port}") if redis_client else None

        def on_step(record) -> None:
            metrics.observe_step(record)
            if telemetry:
                telemetry.emit(record)

        scheduler = Scheduler(verifier, drafter, tokenizer, vinfo.eos_token_ids, scheduler_config, strategy,
                              on_step=on_step, on_finish=metrics.observe_finish)
        admission = Admission(scheduler, config.admission, on_reject=lambda seq: metrics.rejected.labels("slo").inc(),
                              margin=config.admission_margin, on_admit=lambda seq: metrics.admitted.inc())
        limits = Limits(vinfo.max_context, config.max_new_tokens, config.default_max_new_tokens,
                        config.max_prompt_tokens, default_ttft_ms=config.default_ttft_ms,
                        default_tpot_ms=config.default_tpot_ms, max_streams_per_client=config.max_streams_per_client)

        def on_change(live: LiveConfig) -> None:
            scheduler.planner.set_strategy(live.strategy())
            scheduler.config.max_batch_size = live.ops.get("max_batch_size", config.max_batch_size)
            limits.default_ttft_ms = live.ops.get("default_ttft_ms", config.default_ttft_ms)
            limits.default_tpot_ms = live.ops.get("default_tpot_ms", config.default_tpot_ms)
            admission.mode = live.ops.get("admission", config.admission)
            metrics.observe_invalid_ops(live.invalid_ops)

        if redis_client:
            telemetry.start()
            reader = LiveReader(redis_client, LiveConfig(strategy), on_change)
            await reader.refresh_safely()
            reader.start()
            state["background"] = [telemetry, reader]
        info = gateway_pb2.GatewayInfo(
            target_model=vinfo.model_id, draft_model=dinfo.model_id if dinfo else "",
            tokenizer_fingerprint=fingerprint, max_context=vinfo.max_context, max_new_tokens=config.max_new_tokens,
            default_max_new_tokens=config.default_max_new_tokens, max_batch_size=config.max_batch_size, max_queued=config.max_queued)
        metrics.follow(scheduler, telemetry)
        servicer.on_reject = lambda reason: metrics.rejected.labels(reason).inc()
        servicer.attach(scheduler, tokenizer, len(tokenizer), limits, info, admission)
        scheduler.start()
        state["scheduler"] = scheduler

    async def stop() -> None:
        if "http" in state:
            state["http"].should_exit = True
        if "scheduler" in state:
            await state["scheduler"].stop()
        for task in state.get("background", []):
            await task.stop()

    servicer = GatewayServicer()
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server.grpc)
    if http_sock is not None:
        api = http.HttpApi(servicer, server, metrics.registry, keys, config.served_model_name)
        state["http"] = await http.serve_http(api, http_sock, config.tls_cert, config.tls_key)
    await run_until_signalled(server, warm_up, config.grace_s, on_stop=stop)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = cfg.load(GatewayConfig, sys.argv[1:] if argv is None else argv, prog="gateway")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
