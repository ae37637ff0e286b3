"""Opening a model service's model: the runtime, its tokenizer's fingerprint and its stop ids."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import torch

from services.modelservice.config import ModelServiceConfig
from specserve import runtime
from specserve.contracts import WorkerInfo
from specserve.runtime import Runtime
from specserve.tokenizer import fingerprint, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    runtime: Runtime
    fingerprint: str
    eos_token_ids: list[int]
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # this load, in this process

    def info(self, model_id: str, sessions: int, kv_tokens: int) -> WorkerInfo:
        ri = self.runtime.info
        return WorkerInfo(model_id, self.fingerprint, self.runtime.max_context, ri.device, ri.dtype,
                          self.eos_token_ids, sessions, kv_tokens, ri.runtime, ri.model_file,
                          instance_id=self.instance_id)


def load(config: ModelServiceConfig) -> LoadedModel:
    """Open the model on the configured runtime, with its tokenizer's fingerprint and stop ids."""
    if config.threads:
        torch.set_num_threads(config.threads)  # the services' own tensor work (sampling, acceptance)
    started = time.monotonic()
    rt = runtime.open_runtime(config.model, config.runtime, config.device, config.dtype, config.max_context,
                              config.threads, config.max_sessions, config.kv_tokens, config.kv_unified,
                              config.prefix_cache_mb)
    tokenizer = load_tokenizer(config.model)
    eos = list(rt.info.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    log.info("loaded %s on the %s runtime (%s, %s) in %.1fs", rt.info.model_file, rt.info.runtime, rt.info.device,
             rt.info.dtype, time.monotonic() - started)
    print(f"model {rt.info.model_file}: runtime {rt.info.runtime}, {rt.info.dtype} on {rt.info.device}", flush=True)
    return LoadedModel(rt, fingerprint(tokenizer), eos)
