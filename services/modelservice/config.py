"""The configuration of a model service (drafter or verifier)."""

from __future__ import annotations

from dataclasses import dataclass

from specserve import runtime
from specserve.config import SESSION_TTL_S, doc
from specserve.errors import InvalidArgument

PROPOSERS = ("draft_model", "ngram", "suffix", "hybrid")


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
    session_ttl_s: float = doc(SESSION_TTL_S, "evict sessions idle this long")
    threads: int = doc(0, "CPU threads for model compute; 0 keeps the runtime's default (all cores)")
    max_sessions: int = doc(64, "llama.cpp runtime: sessions held at once (one sequence id each)")
    kv_tokens: int = doc(16384, "llama.cpp runtime: KV positions over all sessions; torch: prefix cache bound")
    kv_unified: bool = doc(True, "llama.cpp runtime: one KV buffer shared by all sequences (cheaper mixed batches)")
    prefix_cache_mb: int = doc(1024, "llama.cpp runtime: host memory for released sessions' KV (prefix cache); 0 disables")
    redis_url: str = doc("", "Redis for telemetry and strategy; empty disables both")
    proposer: str = doc("hybrid", "drafter only: " + " or ".join(PROPOSERS))
    step_delay_ms: float = doc(0.0, "artificial delay added to every forward call (load tests only)")
    grace_s: float = doc(10.0, "drain time on SIGTERM")
    instance: str = doc("", "instance name in telemetry; empty uses host:port")
    reprofile: bool = doc(False, "profile again even when a cached profile exists")
    profile_cache: str = doc("", "folder of cached start-up profiles; empty uses ~/.cache/specserve/profiles "
                                 "($XDG_CACHE_HOME/specserve/profiles when that is set)")

    def validate(self) -> None:
        if not self.model:
            raise InvalidArgument("model", "a model folder or id is required")
        if not 0 <= self.port < 65536:
            raise InvalidArgument("port", f"must be in [0, 65535], got {self.port}")
        runtime.choose(self.runtime, self.model or ".", self.device)
        if self.proposer not in PROPOSERS:
            raise InvalidArgument("proposer", f"must be {' or '.join(PROPOSERS)}, got {self.proposer!r}")
