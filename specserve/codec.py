"""Conversions between protobuf messages and the domain dataclasses, in one place."""

from __future__ import annotations

from specserve import contracts as c
from specserve.contracts import SamplingParams
from specserve.v1 import common_pb2, drafter_pb2, verifier_pb2

_STATUS_TO_PB = {c.SessionStatus.OK: common_pb2.SESSION_STATUS_OK,
                 c.SessionStatus.NOT_FOUND: common_pb2.SESSION_STATUS_NOT_FOUND,
                 c.SessionStatus.INVALID: common_pb2.SESSION_STATUS_INVALID,
                 c.SessionStatus.EXHAUSTED: common_pb2.SESSION_STATUS_EXHAUSTED}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}


def sampling_from_pb(pb: common_pb2.SamplingParams, default_max_new_tokens: int = 64) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=pb.max_new_tokens or default_max_new_tokens,
        temperature=pb.temperature,
        top_k=pb.top_k,
        top_p=pb.top_p or 1.0,
        seed=pb.seed if pb.HasField("seed") else None,
        stop=tuple(pb.stop),
    )


def sampling_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_k=p.top_k,
                                   top_p=p.top_p, stop=list(p.stop))
    if p.seed is not None:
        pb.seed = p.seed
    return pb


def _sparse_to_pb(d: c.Sparse) -> common_pb2.SparseDistribution:
    return common_pb2.SparseDistribution(token_ids=d[0], probs=d[1])


def _sparse_from_pb(pb: common_pb2.SparseDistribution) -> c.Sparse:
    return list(pb.token_ids), list(pb.probs)


def info_to_pb(info: c.WorkerInfo, version: str) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        model_id=info.model_id, tokenizer_fingerprint=info.tokenizer_fingerprint, max_context=info.max_context,
        device=info.device, dtype=info.dtype, eos_token_ids=info.eos_token_ids, sessions=info.sessions,
        kv_tokens=info.kv_tokens, version=version, runtime=info.runtime, model_file=info.model_file,
        free_drafts=info.free_drafts, hybrid=info.hybrid, instance_id=info.instance_id)


def info_from_pb(pb: common_pb2.ModelInfo) -> c.WorkerInfo:
    return c.WorkerInfo(pb.model_id, pb.tokenizer_fingerprint, pb.max_context, pb.device, pb.dtype,
                        list(pb.eos_token_ids), pb.sessions, pb.kv_tokens, pb.runtime, pb.model_file, pb.free_drafts,
                        pb.hybrid, pb.instance_id)


# Drafter

def propose_request_to_pb(items: list[c.ProposeItem], proposer: str = "") -> drafter_pb2.ProposeRequest:
    return drafter_pb2.ProposeRequest(proposer=proposer, items=[
        drafter_pb2.ProposeItem(
            session_id=it.session_id, position=it.position, new_token_ids=it.new_tokens,
            max_draft_tokens=it.max_draft_tokens, stop_confidence=it.stop_confidence,
            min_token_confidence=it.min_token_confidence, extend=it.extend, sampling=sampling_to_pb(it.params),
            free_only=it.free_only, max_model_draft_tokens=it.max_model_draft_tokens)
        for it in items])


def propose_request_from_pb(pb: drafter_pb2.ProposeRequest) -> list[c.ProposeItem]:
    return [c.ProposeItem(it.session_id, it.position, list(it.new_token_ids), it.max_draft_tokens,
                          sampling_from_pb(it.sampling), it.stop_confidence, it.min_token_confidence, it.extend,
                          it.free_only, it.max_model_draft_tokens)
            for it in pb.items]


def propose_output_to_pb(out: c.ProposeOutput) -> drafter_pb2.ProposeResponse:
    return drafter_pb2.ProposeResponse(draft_steps=out.draft_steps, draft_ns=out.draft_ns, results=[
        drafter_pb2.DraftResult(session_id=d.session_id, status=_STATUS_TO_PB[d.status], token_ids=d.tokens,
                                confidences=d.confidences, distributions=[_sparse_to_pb(x) for x in d.distributions],
                                model_unread=d.model_unread, free=d.free, recalled=d.recalled)
        for d in out.drafts])


def propose_output_from_pb(pb: drafter_pb2.ProposeResponse) -> c.ProposeOutput:
    return c.ProposeOutput([
        c.Draft(d.session_id, _STATUS_FROM_PB.get(d.status, c.SessionStatus.NOT_FOUND), list(d.token_ids),
                list(d.confidences), [_sparse_from_pb(x) for x in d.distributions], d.model_unread, d.free, d.recalled)
        for d in pb.results], pb.draft_steps, pb.draft_ns)


# Verifier

def _prefill_items_to_pb(items: list[c.PrefillItem]) -> list[verifier_pb2.PrefillItem]:
    return [verifier_pb2.PrefillItem(session_id=it.session_id, prompt_token_ids=it.prompt,
                                     sampling=sampling_to_pb(it.params), partial=it.partial, append=it.append)
            for it in items]


def _prefill_items_from_pb(items) -> list[c.PrefillItem]:
    return [c.PrefillItem(it.session_id, list(it.prompt_token_ids), sampling_from_pb(it.sampling), it.partial, it.append)
            for it in items]


def _prefill_results_to_pb(results: list[c.PrefillResult]) -> list[verifier_pb2.PrefillResult]:
    return [verifier_pb2.PrefillResult(session_id=r.session_id, token_id=r.token_id, cached_tokens=r.cached_tokens,
                                       status=_STATUS_TO_PB[r.status], error=r.error) for r in results]


def _prefill_results_from_pb(results) -> list[c.PrefillResult]:
    # A result without a status (an older verifier) ran.
    return [c.PrefillResult(r.session_id, r.token_id, r.cached_tokens, _STATUS_FROM_PB.get(r.status, c.SessionStatus.OK),
                            r.error) for r in results]


def prefill_request_to_pb(items: list[c.PrefillItem]) -> verifier_pb2.PrefillRequest:
    return verifier_pb2.PrefillRequest(items=_prefill_items_to_pb(items))


def prefill_request_from_pb(pb: verifier_pb2.PrefillRequest) -> list[c.PrefillItem]:
    return _prefill_items_from_pb(pb.items)


def prefill_output_to_pb(out: c.PrefillOutput) -> verifier_pb2.PrefillResponse:
    return verifier_pb2.PrefillResponse(forward_ns=out.forward_ns, results=_prefill_results_to_pb(out.results))


def prefill_output_from_pb(pb: verifier_pb2.PrefillResponse) -> c.PrefillOutput:
    return c.PrefillOutput(_prefill_results_from_pb(pb.results), pb.forward_ns)


def verify_request_to_pb(items: list[c.VerifyItem], prefills: list[c.PrefillItem] = ()) -> verifier_pb2.VerifyRequest:
    return verifier_pb2.VerifyRequest(items=[
        verifier_pb2.VerifyItem(session_id=it.session_id, position=it.position, draft_token_ids=it.drafts,
                                draft_distributions=[_sparse_to_pb(x) for x in it.distributions],
                                plain_steps=it.plain_steps)
        for it in items], prefills=_prefill_items_to_pb(prefills))


def verify_request_from_pb(pb: verifier_pb2.VerifyRequest) -> tuple[list[c.VerifyItem], list[c.PrefillItem]]:
    return [c.VerifyItem(it.session_id, it.position, list(it.draft_token_ids),
                         [_sparse_from_pb(x) for x in it.draft_distributions], it.plain_steps) for it in pb.items], \
        _prefill_items_from_pb(pb.prefills)


def verify_output_to_pb(out: c.VerifyOutput) -> verifier_pb2.VerifyResponse:
    return verifier_pb2.VerifyResponse(verified_positions=out.verified_positions, forward_ns=out.forward_ns, results=[
        verifier_pb2.VerifyResult(session_id=r.session_id, status=_STATUS_TO_PB[r.status], token_ids=r.tokens,
                                  accepted=r.accepted) for r in out.results], prefills=_prefill_results_to_pb(out.prefills),
        forwards=out.forwards)


def verify_output_from_pb(pb: verifier_pb2.VerifyResponse) -> c.VerifyOutput:
    return c.VerifyOutput([
        c.VerifyResult(r.session_id, _STATUS_FROM_PB.get(r.status, c.SessionStatus.NOT_FOUND), list(r.token_ids),
                       r.accepted) for r in pb.results], pb.verified_positions, pb.forward_ns,
        _prefill_results_from_pb(pb.prefills), max(pb.forwards, 1))
