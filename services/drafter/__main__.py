"""Run the draft service: python -m services.drafter --model PATH [--port N] [--proposer ngram]."""

from __future__ import annotations

import asyncio
import sys

from services.drafter.proposers import Proposer, make_proposer
from services.drafter.servicer import DrafterServicer
from services.modelservice.compute import ComputeThread
from services.modelservice.config import ModelServiceConfig
from services.modelservice.loading import LoadedModel
from services.modelservice.servicer import serve_model
from specserve import config as cfg
from specserve import lifeline
from specserve.contracts import ProposeItem, SamplingParams
from specserve.v1 import drafter_pb2, drafter_pb2_grpc

NAME = drafter_pb2.DESCRIPTOR.services_by_name["Drafter"].full_name


def build(config: ModelServiceConfig, loaded: LoadedModel) -> Proposer:
    kwargs: dict = {"session_ttl_s": config.session_ttl_s}
    if config.proposer in ("suffix", "hybrid"):
        kwargs["stop_tokens"] = tuple(loaded.eos_token_ids)
    if config.proposer in ("draft_model", "hybrid"):
        kwargs["runtime"] = loaded.runtime
    return make_proposer(config.proposer, **kwargs)


def warm(proposer: Proposer) -> None:
    """The first request must not pay for lazy initialisation."""
    proposer.propose([ProposeItem.make_dummy("warm-up")])
    proposer.release(["warm-up"])


def profile(proposer: Proposer) -> list[dict]:
    """Steady-state draft loops (one newly committed token, then k drafts) at a few lengths and
    batch sizes: the policy seeds its cost model with these records."""
    records = []
    for batch, k in ((1, 1), (1, 4), (2, 2), (4, 3), (1, 2), (2, 4), (4, 1), (1, 3)):
        ids = [f"profile-{i}" for i in range(batch)]
        prompts = [[(5 * j + i) % 64 + 3 for j in range(32)] for i in range(batch)]
        proposer.propose([ProposeItem.make_dummy(sid, p, 0) for sid, p in zip(ids, prompts)])
        out = proposer.propose([ProposeItem(sid, len(p), [7], k, SamplingParams()) for sid, p in zip(ids, prompts)])
        records.append({"call": "profile", "batch_size": batch, "draft_steps": out.draft_steps,
                        "draft_ms": out.draft_ns / 1e6, "free": getattr(proposer, "free", False)})
        proposer.release(ids)
    return records


PROFILE_VERSION = "2"  # changes whenever what `profile` measures changes (cached profiles are keyed by it)


def main(argv: list[str] | None = None) -> None:
    cfg.setup_logging()
    lifeline.follow()  # end with the launcher that started this process, if any
    config = cfg.load(ModelServiceConfig, sys.argv[1:] if argv is None else argv, prog="drafter")
    servicer = DrafterServicer(config.model, ComputeThread(config.step_delay_ms), config.proposer)
    asyncio.run(serve_model(
        config, NAME, servicer, drafter_pb2_grpc.add_DrafterServicer_to_server,
        lambda loaded: build(config, loaded), warm, profile=profile, profile_version=PROFILE_VERSION))


if __name__ == "__main__":
    main()
