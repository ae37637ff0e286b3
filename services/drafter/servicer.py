"""Drafter servicer: validate, convert, call the proposer on the compute thread, convert back."""

from __future__ import annotations

from services.modelservice.servicer import ModelServicer, unique_ids
from specserve import codec
from specserve.errors import InvalidArgument
from specserve.v1 import drafter_pb2_grpc


class DrafterServicer(ModelServicer, drafter_pb2_grpc.DrafterServicer):
    def __init__(self, model_id: str, compute, proposer_name: str):
        super().__init__(model_id, compute)
        self.proposer_name = proposer_name


    async def Propose(self, request, context):
        worker = self.ready()
        if request.proposer and request.proposer != self.proposer_name:
            raise InvalidArgument("proposer", f"this drafter runs {self.proposer_name!r}, not {request.proposer!r}")
        items = codec.propose_request_from_pb(request)
        unique_ids([it.session_id for it in items], "items.session_id")
        for it in items:
            if it.max_draft_tokens < 0:
                raise InvalidArgument("items.max_draft_tokens", f"must be >= 0, got {it.max_draft_tokens}")
            if it.position < 0:
                raise InvalidArgument("items.position", f"must be >= 0, got {it.position}")
        out = await self.compute.run(worker.propose, items)
        self.record("propose", len(items), draft_steps=out.draft_steps, draft_ms=out.draft_ns / 1e6,
                    drafted=[len(d.tokens) for d in out.drafts])
        return codec.propose_output_to_pb(out)
