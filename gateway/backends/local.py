"""The whole step loop in one process: both models and the scheduler, no gRPC in between (for
tests and benchmarks; the gateway process itself never loads a model)."""

from __future__ import annotations

import asyncio

from gateway.scheduler import Scheduler, SchedulerConfig
from services.drafter.proposers import make_proposer
from services.modelservice.compute import ComputeThread
from services.verifier.worker import VerifierWorker
from specserve.contracts import PrefillOutput, ProposeOutput, VerifyOutput, WorkerInfo
from specserve.errors import DeadlineExceeded
from specserve.runtime import Runtime
from specserve.strategy import Strategy


class _Local:
    """A worker in this process, on its own compute thread; a call past its timeout raises
    DeadlineExceeded (the work goes on, as it would on a remote service)."""

    def __init__(self, worker, info: WorkerInfo, delay_ms: float = 0.0):
        self.worker, self._info, self.compute = worker, info, ComputeThread(delay_ms)

    async def info(self, timeout=None) -> WorkerInfo:
        return self._info

    async def _run(self, fn, *args, timeout: float | None):
        try:
            return await asyncio.wait_for(asyncio.shield(self.compute.run(fn, *args)), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"{type(self).__name__} did not answer in {timeout:.2f}s") from None

    async def release(self, session_ids, timeout=None, owner="") -> int:
        return await self.compute.run(lambda: self.worker.release([*session_ids, *self.worker.sessions.owned_by(owner)]))


class LocalVerifier(_Local):
    async def prefill(self, items, timeout=None) -> PrefillOutput:
        return await self._run(self.worker.prefill, items, timeout=timeout)

    async def verify(self, items, prefills=(), timeout=None) -> VerifyOutput:
        return await self._run(self.worker.verify, items, list(prefills), timeout=timeout)

    async def end_burst(self, timeout=None) -> None:
        self.worker.end_burst.set()


class LocalDrafter(_Local):
    async def propose(self, items, timeout=None) -> ProposeOutput:
        return await self._run(self.worker.propose, items, timeout=timeout)


def local_scheduler(target: Runtime, draft: Runtime | None, tokenizer, eos_ids: list[int],
                    config: SchedulerConfig | None = None, strategy: Strategy | None = None,
                    proposer: str = "draft_model", verify_delay_ms: float = 0.0, draft_delay_ms: float = 0.0,
                    **hooks) -> Scheduler:
    """target, draft: model runtimes (draft may be None for target-only decoding)."""
    info = WorkerInfo("local", "", target.max_context, target.info.device, target.info.dtype, eos_ids, 0, 0,
                      target.info.runtime)
    verifier = LocalVerifier(VerifierWorker(target, eos_token_ids=tuple(eos_ids)), info, verify_delay_ms)
    drafter = None
    if proposer in ("ngram", "suffix"):
        drafter = LocalDrafter(make_proposer(proposer), info, draft_delay_ms)
    elif draft is not None:
        drafter = LocalDrafter(make_proposer(proposer, runtime=draft), info, draft_delay_ms)
    return Scheduler(verifier, drafter, tokenizer, eos_ids, config or SchedulerConfig(), strategy,
                     draft_free=proposer in ("ngram", "suffix"), hybrid=proposer == "hybrid", **hooks)
