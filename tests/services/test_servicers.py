"""Each servicer through its proto, on an in-process server at port 0, with the tiny pair."""

import grpc
import pytest

from gateway.admission import Admission
from gateway.request import Limits
from gateway.servicer import GatewayServicer
from services.drafter.proposers import make_proposer
from services.drafter.servicer import DrafterServicer
from services.modelservice.compute import ComputeThread
from services.modelservice.loading import LoadedModel
from services.verifier.servicer import VerifierServicer
from services.verifier.worker import VerifierWorker
from specserve.server import Server
from specserve.v1 import (
    common_pb2,
    drafter_pb2,
    drafter_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    verifier_pb2,
    verifier_pb2_grpc,
)


async def _serve(add, servicer):
    server = Server(["test"])
    add(servicer, server.grpc)
    port = server.bind("127.0.0.1:0")
    await server.start()
    await server.set_serving(True)
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def _loaded(runtime, tokenizer):
    return LoadedModel(runtime, "fp", [tokenizer.eos_token_id])


async def test_verifier_prefill_verify_release(tiny_pair):
    target, _ = tiny_pair.runtimes()
    servicer = VerifierServicer("tiny", ComputeThread())
    servicer.attach(VerifierWorker(target), _loaded(target, tiny_pair.tokenizer))
    server, channel = await _serve(verifier_pb2_grpc.add_VerifierServicer_to_server, servicer)
    stub = verifier_pb2_grpc.VerifierStub(channel)
    out = await stub.Prefill(verifier_pb2.PrefillRequest(items=[{"session_id": "a", "prompt_token_ids": [5, 6, 7]}]))
    first = out.results[0].token_id
    res = await stub.Verify(verifier_pb2.VerifyRequest(items=[
        {"session_id": "a", "position": 4, "draft_token_ids": [9, 9]},
        {"session_id": "ghost", "position": 3}]))
    assert res.results[0].status == common_pb2.SESSION_STATUS_OK and 1 <= len(res.results[0].token_ids) <= 3
    assert res.results[1].status == common_pb2.SESSION_STATUS_NOT_FOUND
    assert res.verified_positions == 3 and first >= 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Prefill(verifier_pb2.PrefillRequest(items=[{"session_id": "b", "prompt_token_ids": []}]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_token_ids" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Verify(verifier_pb2.VerifyRequest(items=[{"session_id": "a", "position": 1}] * 2))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = await stub.Info(common_pb2.InfoRequest())
    assert info.sessions == 1 and info.tokenizer_fingerprint == "fp" and info.runtime == tiny_pair.runtime
    assert (await stub.Release(common_pb2.ReleaseRequest(session_ids=["a", "x"]))).released == 1
    await server.stop(0)


async def test_drafter_propose_and_resync(tiny_pair):
    _, draft = tiny_pair.runtimes()
    servicer = DrafterServicer("tiny", ComputeThread(), "draft_model")
    servicer.attach(make_proposer("draft_model", runtime=draft), _loaded(draft, tiny_pair.tokenizer))
    server, channel = await _serve(drafter_pb2_grpc.add_DrafterServicer_to_server, servicer)
    stub = drafter_pb2_grpc.DrafterStub(channel)
    out = await stub.Propose(drafter_pb2.ProposeRequest(items=[
        {"session_id": "a", "position": 0, "new_token_ids": [5, 6, 7], "max_draft_tokens": 4},
        {"session_id": "b", "position": 0, "new_token_ids": [8], "max_draft_tokens": 2,
         "sampling": {"temperature": 0.8, "top_k": 5}}]))
    a, b = out.results
    assert len(a.token_ids) == 4 and len(a.confidences) == 4 and not a.distributions
    assert len(b.token_ids) == 2 and len(b.distributions) == 2 and len(b.distributions[0].token_ids) <= 5
    stale = await stub.Propose(drafter_pb2.ProposeRequest(items=[{"session_id": "a", "position": 9, "max_draft_tokens": 1}]))
    assert stale.results[0].status == common_pb2.SESSION_STATUS_NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Propose(drafter_pb2.ProposeRequest(items=[{"session_id": "a", "max_draft_tokens": -1}]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_draft_tokens" in err.value.details()
    await server.stop(0)


async def test_drafter_release_waits_for_the_next_propose_then_runs_before_it_drafts():
    """A release by id only marks the session: its work (the suffix index taking the output) runs
    at the start of the next Propose, off the verifier's next forward; that Propose already drafts
    from the released output. An owner's sessions are released at once."""
    proposer = make_proposer("suffix")
    servicer = DrafterServicer("suffix", ComputeThread(), "suffix")
    servicer.attach(proposer, LoadedModel(None, "fp", [0]))
    released, release = [], proposer.release
    proposer.release = lambda ids: released.append([*ids]) or release(ids)
    server, channel = await _serve(drafter_pb2_grpc.add_DrafterServicer_to_server, servicer)
    stub = drafter_pb2_grpc.DrafterStub(channel)

    async def propose(sid, position, tokens):
        out = await stub.Propose(drafter_pb2.ProposeRequest(items=[
            {"session_id": sid, "position": position, "new_token_ids": tokens, "max_draft_tokens": 8}]))
        return list(out.results[0].token_ids)

    await propose("a", 0, [1, 2, 3])
    await propose("a", 3, list(range(11, 31)))  # its output
    assert (await stub.Release(common_pb2.ReleaseRequest(session_ids=["a", "zz"]))).released == 1
    assert released == [] and "a" in proposer.sessions
    # b's prompt ends where a's output began: its drafts continue a's output from the global index.
    assert (await propose("b", 0, [7, 11, 12]))[:3] == [13, 14, 15]
    assert released == [["a"]] and "a" not in proposer.sessions
    await propose("g/1", 0, [4, 5])
    assert (await stub.Release(common_pb2.ReleaseRequest(owner="g"))).released == 1
    assert "g/1" not in proposer.sessions
    await server.stop(0)


BAD_REQUESTS = [
    ({}, "input"),
    ({"prompt": "x", "prompt_token_ids": {"ids": [1]}}, "input"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "sampling": {"max_new_tokens": -1}}, "sampling.max_new_tokens"),
    ({"prompt": "x", "sampling": {"max_new_tokens": 100000}}, "sampling.max_new_tokens"),
    ({"prompt": "x", "sampling": {"temperature": -1}}, "sampling.temperature"),
    ({"prompt": "x", "sampling": {"top_p": 1.5}}, "sampling.top_p"),
    ({"prompt": "x", "sampling": {"top_k": -2}}, "sampling.top_k"),
    ({"prompt": "x", "slo": {"tpot_ms": -5}}, "slo.tpot_ms"),
    ({"messages": {"messages": [{"role": "wizard", "content": "hi"}]}}, "messages[0].role"),
    ({"prompt_token_ids": {"ids": list(range(2000))}}, "prompt"),
    ({"prompt_token_ids": {"ids": [10**6]}}, "prompt_token_ids"),
]


@pytest.fixture
async def gateway_stub(tiny_models):
    tokenizer = tiny_models.tokenizer
    scheduler = tiny_models.scheduler()
    servicer = GatewayServicer()
    servicer.attach(scheduler, tokenizer, len(tokenizer), Limits(1024), gateway_pb2.GatewayInfo(), Admission(scheduler))
    scheduler.start()
    server, channel = await _serve(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer)
    yield gateway_pb2_grpc.GatewayStub(channel)
    await scheduler.stop()
    await server.stop(0)


@pytest.mark.parametrize("fields, field", BAD_REQUESTS)
async def test_gateway_rejects_bad_input_naming_the_field(gateway_stub, fields, field):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in gateway_stub.Generate(gateway_pb2.GenerateRequest(**fields)):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field), err.value.details()


async def test_gateway_streams_text_and_stats(gateway_stub):
    messages = [m async for m in gateway_stub.Generate(gateway_pb2.GenerateRequest(
        messages={"messages": [{"role": "user", "content": "hello"}]}, sampling={"max_new_tokens": 12}))]
    last = messages[-1]
    assert last.finish_reason in (gateway_pb2.FINISH_REASON_LENGTH, gateway_pb2.FINISH_REASON_EOS)
    assert sum(len(m.token_ids) for m in messages) == last.stats.output_tokens
    assert last.stats.prompt_tokens > 0 and last.stats.slo_attained


async def test_two_requests_with_one_request_id_both_complete(gateway_stub):
    """The client's request_id is echoed, never the session key: the same id twice runs two sessions."""
    import asyncio

    async def run(prompt: str) -> list:
        request = gateway_pb2.GenerateRequest(request_id="same", prompt=prompt, sampling={"max_new_tokens": 6})
        return [m async for m in gateway_stub.Generate(request)]

    first, second = await asyncio.wait_for(asyncio.gather(run("def add(a, b):"), run("class Stack:")), 120)
    for messages in (first, second):
        assert messages[-1].HasField("stats") and messages[-1].stats.output_tokens >= 1
        assert {m.request_id for m in messages} == {"same"}


def test_start_up_profiles_measure_steady_state_steps(tiny_pair):
    from services.drafter.__main__ import profile as profile_drafter
    from services.verifier.__main__ import PROFILE_CONTEXT, PROFILE_LONG_DRAFTS, PROFILE_PROMPTS
    from services.verifier.__main__ import profile as profile_verifier

    target, draft = tiny_pair.runtimes()
    drafts = profile_drafter(make_proposer("draft_model", runtime=draft))
    assert [r["draft_steps"] for r in drafts] == [1, 4, 2, 3, 2, 4, 1, 3]
    assert all(r["draft_ms"] > 0 for r in drafts)
    worker = VerifierWorker(target)
    verifies = profile_verifier(worker)
    # Verify steps of 1-8 positions, long verifies that fit, then prompt chunks up to the context
    # (each computed in full: the profile's prompts share no prefix, so none comes from the cache).
    long = [d + 1 for d in PROFILE_LONG_DRAFTS if PROFILE_CONTEXT + d < worker.max_context]
    fitting = [n for n in PROFILE_PROMPTS if n < worker.max_context]
    assert [r["verified_positions"] for r in verifies] == [1, 2, 3, 4, 5, 6, 8] * 2 + long + fitting
    assert [r.get("prompt", False) for r in verifies] == [False] * (14 + len(long)) + [True] * len(fitting)
    assert all(r["forward_ms"] > 0 for r in verifies)


async def test_a_stream_whose_client_left_before_the_first_byte_gives_its_slot_back(tiny_models):
    """The HTTP response fails at its first send (the client is gone): the stream is closed anyway
    and its session cancelled, so no slot leaks."""
    import asyncio
    import json

    from prometheus_client import CollectorRegistry
    from starlette.requests import ClientDisconnect

    from gateway.http import HttpApi

    tokenizer = tiny_models.tokenizer
    scheduler = tiny_models.scheduler()
    servicer = GatewayServicer()
    servicer.attach(scheduler, tokenizer, len(tokenizer), Limits(1024), gateway_pb2.GatewayInfo(target_model="tiny"),
                    Admission(scheduler))
    scheduler.start()
    server = Server(["test"])
    server.serving = True
    api = HttpApi(servicer, server, CollectorRegistry(), set(), "tiny")
    body = json.dumps({"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 50, "stream": True}).encode()
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message["type"])
        if message["type"] == "http.response.start":
            raise OSError("client went away")

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    try:
        for _ in range(3):
            with pytest.raises((OSError, ClientDisconnect)):
                await api.app(scope, receive, send)
        assert sent.count("http.response.start") == 3  # each response failed at its first byte
        assert servicer.streams == {}
        deadline = asyncio.get_running_loop().time() + 60
        while (scheduler.running or scheduler.waiting) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert not scheduler.running and not scheduler.waiting
    finally:
        await scheduler.stop()
