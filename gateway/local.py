"""The whole step loop in one process: both models and the scheduler, no gRPC in between."""

from __future__ import annotations

from gateway.backends import LocalDrafter, LocalVerifier
from gateway.scheduler import Scheduler, SchedulerConfig
from specserve.contracts import WorkerInfo
from specserve.proposers import make_proposer
from specserve.strategy import Strategy
from specserve.target import TargetWorker


def local_scheduler(target, draft, tokenizer, eos_ids: list[int], max_context: int,
                    config: SchedulerConfig | None = None, strategy: Strategy | None = None,
                    proposer: str = "draft_model", verify_delay_ms: float = 0.0, **hooks) -> Scheduler:
    """target, draft: loaded causal LMs (draft may be None for target-only decoding)."""
    info = WorkerInfo("local", "", max_context, str(target.device), str(target.dtype), eos_ids, 0, 0)
    verifier = LocalVerifier(TargetWorker(target, max_context), info, verify_delay_ms)
    drafter = None
    if proposer == "ngram":
        drafter = LocalDrafter(make_proposer("ngram"), info)
    elif draft is not None:
        drafter = LocalDrafter(make_proposer("draft_model", model=draft, max_context=max_context), info)
    return Scheduler(verifier, drafter, tokenizer, eos_ids, config or SchedulerConfig(), strategy, **hooks)
