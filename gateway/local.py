"""The whole step loop in one process: both models and the scheduler, no gRPC in between."""

from __future__ import annotations

from gateway.backends import LocalDrafter, LocalVerifier
from gateway.scheduler import Scheduler, SchedulerConfig
from specserve.contracts import WorkerInfo
from specserve.proposers import make_proposer
from specserve.runtime import Runtime
from specserve.strategy import Strategy
from specserve.target import TargetWorker


def local_scheduler(target: Runtime, draft: Runtime | None, tokenizer, eos_ids: list[int],
                    config: SchedulerConfig | None = None, strategy: Strategy | None = None,
                    proposer: str = "draft_model", verify_delay_ms: float = 0.0, **hooks) -> Scheduler:
    """target, draft: model runtimes (draft may be None for target-only decoding)."""
    info = WorkerInfo("local", "", target.max_context, target.info.device, target.info.dtype, eos_ids, 0, 0,
                      target.info.runtime)
    verifier = LocalVerifier(TargetWorker(target), info, verify_delay_ms)
    drafter = None
    if proposer == "ngram":
        drafter = LocalDrafter(make_proposer("ngram"), info)
    elif draft is not None:
        drafter = LocalDrafter(make_proposer("draft_model", runtime=draft), info)
    return Scheduler(verifier, drafter, tokenizer, eos_ids, config or SchedulerConfig(), strategy, **hooks)
