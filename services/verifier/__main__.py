"""Run the verify service: python -m services.verifier --model PATH [--port N]."""

from __future__ import annotations

import asyncio
import sys

from services.modelservice.compute import ComputeThread
from services.modelservice.config import ModelServiceConfig
from services.modelservice.servicer import serve_model
from services.verifier.servicer import VerifierServicer
from services.verifier.worker import VerifierWorker
from specserve import config as cfg
from specserve import lifeline
from specserve.contracts import PrefillItem, SamplingParams, VerifyItem
from specserve.v1 import verifier_pb2, verifier_pb2_grpc

NAME = verifier_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name


def warm(worker: VerifierWorker) -> None:
    """The first request must not pay for lazy initialisation."""
    worker.prefill([PrefillItem("warm-up", [1, 2, 3], SamplingParams())])
    worker.verify([VerifyItem.make_dummy("warm-up", 4, [5, 6])])
    worker.release(["warm-up"])


def profile(worker: VerifierWorker) -> list[dict]:
    """Forward times by positions, the tables the policy seeds its cost model with: verify steps of
    1 to 8 positions (twice each) and of a long free draft's 16 to 64, and prompt chunks up to the
    runtime's batch, so no step the scheduler plans (decode rows plus prompt tokens, or a copy's
    long verify) is priced far past a measurement of its kind."""
    prompt = _prompt(PROFILE_CONTEXT, 0)
    records = []
    for drafts in PROFILE_DRAFTS * 2 + tuple(d for d in PROFILE_LONG_DRAFTS if len(prompt) + d < worker.max_context):
        worker.prefill([PrefillItem("profile", prompt, SamplingParams())])
        out = worker.verify([VerifyItem("profile", len(prompt) + 1, [5] * drafts)])
        records.append({"call": "profile", "verified_positions": out.verified_positions,
                        "context_tokens": len(prompt) + 1, "forward_ms": out.forward_ns / 1e6})
    worker.release(["profile"])
    for salt, length in enumerate(PROFILE_PROMPTS, start=1):
        if length >= worker.max_context:
            break
        sid = f"profile-prompt-{length}"
        out = worker.prefill([PrefillItem(sid, _prompt(length, salt), SamplingParams())])
        records.append({"call": "profile", "verified_positions": length, "context_tokens": 0,
                        "forward_ms": out.forward_ns / 1e6, "prompt": True})
        worker.release([sid])
    return records


def _prompt(length: int, salt: int) -> list[int]:
    """Ids every vocabulary has; prompts of different salts share no prefix (no cache hit)."""
    return [(7 * i + 11 * salt) % 64 + 3 for i in range(length)]


PROFILE_VERSION = "3"  # changes whenever what `profile` measures changes (cached profiles are keyed by it)
PROFILE_CONTEXT = 64
# Verified positions 1-6 and 8: neighbours, so the policy sees where the cost steps up.
PROFILE_DRAFTS = (0, 1, 2, 3, 4, 5, 7)
PROFILE_LONG_DRAFTS = (15, 31, 63)  # once each: a free drafter's copies verify this many
# Prompt chunks (one forward each): the step sizes stall-free batching and admission price.
PROFILE_PROMPTS = (16, 64, 128, 256, 512)


def main(argv: list[str] | None = None) -> None:
    cfg.setup_logging()
    lifeline.follow()  # end with the launcher that started this process, if any
    config = cfg.load(ModelServiceConfig, sys.argv[1:] if argv is None else argv, prog="verifier")
    servicer = VerifierServicer(config.model, ComputeThread(config.step_delay_ms))
    asyncio.run(serve_model(
        config, NAME, servicer, verifier_pb2_grpc.add_VerifierServicer_to_server,
        lambda loaded: VerifierWorker(loaded.runtime, config.session_ttl_s, tuple(loaded.eos_token_ids)), warm, profile=profile,
        profile_version=PROFILE_VERSION))


if __name__ == "__main__":
    main()
