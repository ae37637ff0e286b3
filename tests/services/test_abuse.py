"""Abuse: API keys, per-client limits, and property-based fuzzing of requests and ops keys."""

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.admission import Admission
from gateway.request import Limits
from gateway.servicer import GatewayServicer
from specserve.errors import InvalidArgument
from specserve.ops import OPS_KEYS, parse_op
from specserve.server import ApiKeyInterceptor, Server
from specserve.v1 import gateway_pb2, gateway_pb2_grpc

NAME = "specserve.v1.Gateway"


async def _gateway(tiny_models, keys=None, limits=None):
    tokenizer = tiny_models.tokenizer
    scheduler = tiny_models.scheduler(max_context=256)
    servicer = GatewayServicer()
    servicer.attach(scheduler, tokenizer, len(tokenizer), limits or Limits(256, max_new_tokens=64),
                    gateway_pb2.GatewayInfo(), Admission(scheduler))
    scheduler.start()
    server = Server([NAME], interceptors=[ApiKeyInterceptor(keys, f"/{NAME}/")] if keys else None)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server.grpc)
    port = server.bind("127.0.0.1:0")
    await server.start()
    return server, scheduler, gateway_pb2_grpc.GatewayStub(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))


async def _drain(call) -> list:
    return [m async for m in call]


async def test_api_key_is_required_when_configured(tiny_models):
    server, scheduler, stub = await _gateway(tiny_models, keys={"s3cret"})
    request = gateway_pb2.GenerateRequest(prompt="hi", sampling={"max_new_tokens": 2})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _drain(stub.Generate(request))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError):
        await _drain(stub.Generate(request, metadata=(("authorization", "Bearer wrong"),)))
    out = await _drain(stub.Generate(request, metadata=(("authorization", "Bearer s3cret"),)))
    assert out[-1].stats.output_tokens >= 1
    await scheduler.stop()
    await server.stop(0)


async def test_concurrent_streams_per_client_are_limited(tiny_models):
    server, scheduler, stub = await _gateway(tiny_models, limits=Limits(256, max_new_tokens=64, max_streams_per_client=1))
    long = stub.Generate(gateway_pb2.GenerateRequest(prompt="hi", sampling={"max_new_tokens": 60}))
    await long.read()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _drain(stub.Generate(gateway_pb2.GenerateRequest(prompt="hi", sampling={"max_new_tokens": 2})))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    long.cancel()
    await scheduler.stop()
    await server.stop(0)


requests = st.builds(
    dict,
    prompt=st.one_of(st.none(), st.text(max_size=40)),
    ids=st.one_of(st.none(), st.lists(st.integers(-5, 10**6), max_size=30)),
    roles=st.one_of(st.none(), st.lists(st.sampled_from(["user", "system", "assistant", "", "root"]), max_size=3)),
    max_new=st.integers(-3, 200), temperature=st.one_of(st.floats(-2, 3), st.sampled_from([float("nan"), float("inf")])), top_k=st.integers(-3, 500),
    top_p=st.one_of(st.floats(-1, 2), st.just(float("nan"))), ttft=st.integers(-10, 10**6), stop=st.lists(st.text(max_size=3), max_size=3),
)


def _build(r) -> gateway_pb2.GenerateRequest:
    req = gateway_pb2.GenerateRequest(sampling={"max_new_tokens": r["max_new"], "temperature": r["temperature"],
                                                "top_k": r["top_k"], "top_p": r["top_p"], "stop": r["stop"]},
                                      slo={"ttft_ms": r["ttft"]})
    if r["prompt"] is not None:
        req.prompt = r["prompt"]
    if r["ids"] is not None:
        req.prompt_token_ids.ids.extend(r["ids"])
    if r["roles"] is not None:
        for role in r["roles"]:
            req.messages.messages.add(role=role, content="x")
    return req


async def test_fuzzed_requests_get_a_stream_or_a_clear_status(tiny_models):
    server, scheduler, stub = await _gateway(tiny_models)
    seen = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(requests)
    def collect(r):
        seen.append(_build(r))

    collect()
    for request in seen:
        try:
            out = await _drain(stub.Generate(request, timeout=30))
            assert out and out[-1].HasField("stats")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), exc
            assert exc.details()
    # The service is still healthy after all of that.
    ok = await _drain(stub.Generate(gateway_pb2.GenerateRequest(prompt="def", sampling={"max_new_tokens": 3})))
    assert ok[-1].stats.output_tokens >= 1
    await scheduler.stop()
    await server.stop(0)


@settings(max_examples=300)
@given(st.sampled_from([*OPS_KEYS, "unknown"]), st.text(max_size=12))
def test_fuzzed_ops_values_are_accepted_or_rejected_cleanly(name, raw):
    try:
        parse_op(name, raw)
    except InvalidArgument as exc:
        assert exc.field == name


async def test_tls_only_when_configured(tiny_models, tmp_path):
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    tokenizer = tiny_models.tokenizer
    scheduler = tiny_models.scheduler(max_context=256)
    servicer = GatewayServicer()
    servicer.attach(scheduler, tokenizer, len(tokenizer), Limits(256), gateway_pb2.GatewayInfo(), Admission(scheduler))
    scheduler.start()
    server = Server([NAME])
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server.grpc)
    port = server.bind("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    await server.start()
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    secure = gateway_pb2_grpc.GatewayStub(grpc.aio.secure_channel(f"localhost:{port}", creds))
    request = gateway_pb2.GenerateRequest(prompt="hi", sampling={"max_new_tokens": 2})
    assert (await _drain(secure.Generate(request)))[-1].stats.output_tokens >= 1
    plain = gateway_pb2_grpc.GatewayStub(grpc.aio.insecure_channel(f"localhost:{port}"))
    with pytest.raises(grpc.aio.AioRpcError):
        await _drain(plain.Generate(request, timeout=5))
    await scheduler.stop()
    await server.stop(0)
