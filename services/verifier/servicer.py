"""Verifier servicer: validate, convert, call the target worker on the compute thread, convert back."""

from __future__ import annotations

from services.modelservice.servicer import ModelServicer, unique_ids
from specserve import codec
from specserve.contracts import PrefillItem
from specserve.v1 import verifier_pb2, verifier_pb2_grpc


class VerifierServicer(ModelServicer, verifier_pb2_grpc.VerifierServicer):

    def _check_prefills(self, items: list[PrefillItem], field: str) -> None:
        for it in items:
            it.params.validate(f"{field}.sampling", max_new_tokens_limit=self.loaded.runtime.max_context)

    async def Prefill(self, request, context):
        worker = self.ready()
        items = codec.prefill_request_from_pb(request)
        unique_ids([it.session_id for it in items], "items.session_id")
        self._check_prefills(items, "items")
        out = await self.compute.run(worker.prefill, items)
        self.record("prefill", len(items), prompt_tokens=sum(len(it.prompt) for it in items),
                    cached_tokens=sum(r.cached_tokens for it, r in zip(items, out.results) if not it.append),
                    forward_ms=out.forward_ns / 1e6)
        return codec.prefill_output_to_pb(out)

    async def Verify(self, request, context):
        worker = self.ready()
        items, prefills = codec.verify_request_from_pb(request)
        unique_ids([it.session_id for it in [*items, *prefills]], "items.session_id")
        self._check_prefills(prefills, "prefills")
        out = await self.compute.run(worker.verify, items, prefills)
        self.record("verify", len(items), verified_positions=out.verified_positions, forward_ms=out.forward_ns / 1e6,
                    drafted=[len(it.drafts) for it in items], accepted=[r.accepted for r in out.results],
                    prompt_tokens=sum(len(it.prompt) for it in prefills), forwards=out.forwards)
        return codec.verify_output_to_pb(out)

    async def EndBurst(self, request, context):
        self.ready().end_burst.set()  # read by the compute thread between a burst's forwards
        return verifier_pb2.EndBurstResponse()
