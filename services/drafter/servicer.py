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
        self.deferred: list[str] = []  # sessions released by id, released at the start of the next Propose

    async def Release(self, request, context):
        """Sessions named by id are released at the start of the next Propose, before it drafts:
        released now, the suffix index taking each output and the model saving its KV would share
        the cores with the verifier's forward for the next request, which the gateway starts at
        once. `released` counts the sessions the drafter holds. An owner's sessions (a gateway's
        restart) are released at once."""
        if request.owner:
            return await super().Release(request, context)
        from specserve.v1 import common_pb2

        worker = self.ready()
        held = [sid for sid in request.session_ids if sid in worker.sessions and sid not in self.deferred]
        self.deferred += held
        return common_pb2.ReleaseResponse(released=len(held))

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
        released, self.deferred = self.deferred, []

        def propose():
            if released:
                worker.release(released)
            return worker.propose(items)

        out = await self.compute.run(propose)
        self.record("propose", len(items), draft_steps=out.draft_steps, draft_ms=out.draft_ns / 1e6,
                    drafted=[len(d.tokens) for d in out.drafts])
        return codec.propose_output_to_pb(out)
