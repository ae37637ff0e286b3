"""The OpenAI-compatible HTTP API against the running stack (real processes, tiny pair), through the
official `openai` client, raw HTTP and a hypothesis fuzz of request bodies."""

import json
import time

import grpc
import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specserve.launcher import Stack
from specserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, verifier_pb2_grpc

pytestmark = pytest.mark.processes  # starts the services as processes

KEY = "test-key"


@pytest.fixture(scope="module")
def stack(tiny_dir, redis_url):
    target, draft = tiny_dir
    env = {"SPECSERVE_THREADS": "1", "SPECSERVE_API_KEYS": KEY, "SPECSERVE_MODE": "static"}
    s = Stack(str(target), str(draft), redis_url, policy=False, extra_env=env).start(timeout_s=120)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.http_address}/v1", api_key=KEY, max_retries=0, timeout=60)


def _grpc_tokens(stack, prompt: str, n: int) -> tuple[list[int], str]:
    with grpc.insecure_channel(stack.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.GenerateRequest(prompt=prompt, sampling={"max_new_tokens": n})
        messages = list(stub.Generate(request, metadata=[("authorization", f"Bearer {KEY}")], timeout=60))
    return [t for m in messages for t in m.token_ids], "".join(m.text for m in messages)


def test_models_lists_the_target_with_its_draft(client, tiny_dir):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-target"]
    assert models[0].model_extra["metadata"]["draft_model"] == str(tiny_dir[1])


def test_greedy_completion_equals_the_grpc_answer(client, stack):
    tokens, text = _grpc_tokens(stack, "def add(a, b):", 12)
    out = client.completions.create(model="tiny-target", prompt="def add(a, b):", max_tokens=12, temperature=0)
    assert out.choices[0].text == text and out.usage.completion_tokens == len(tokens)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.prompt_tokens > 0
    streamed = client.completions.create(model="tiny-target", prompt="def add(a, b):", max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == len(tokens) and not chunks[-1].choices


def test_chat_streams_and_answers_whole(client):
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="tiny-target", messages=messages, max_completion_tokens=10,
                                           temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model="tiny-target", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_and_seeds(client):
    free = client.completions.create(model="tiny-target", prompt="for i in", max_tokens=16, temperature=0).choices[0].text
    stop = free[4:6] if len(free) >= 6 else "zz"
    cut = client.completions.create(model="tiny-target", prompt="for i in", max_tokens=16, temperature=0, stop=[stop])
    if stop in free:
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
        assert free.startswith(cut.choices[0].text)
    runs = [client.completions.create(model="tiny-target", prompt="class", max_tokens=12, temperature=0.9, seed=7)
            .choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


def test_slo_extension_through_extra_body(client):
    out = client.completions.create(model="tiny-target", prompt="x", max_tokens=3, temperature=0,
                                    extra_body={"slo": {"ttft_ms": 60000, "tpot_ms": 60000}, "priority": 2, "top_k": 5})
    assert out.usage.completion_tokens == 3
    with pytest.raises(openai.RateLimitError) as err:  # no request can meet a 1 ms TTFT: rejected at once
        client.completions.create(model="tiny-target", prompt="x" * 200, max_tokens=3, extra_body={"slo": {"ttft_ms": 1}})
    assert int(err.value.response.headers["retry-after"]) >= 1


def test_every_error_status_in_openai_shape(client, stack):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-target", prompt="x", max_tokens=10**6)
    assert err.value.body["param"] == "max_tokens" and err.value.body["message"].startswith("max_tokens")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-target", prompt="x", temperature=-1)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-target", prompt="x", n=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="x")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.http_address}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.APIStatusError) as err:  # a deadline that passes mid-request
        client.completions.create(model="tiny-target", prompt="x", max_tokens=400, temperature=0,
                                  extra_body={"slo": {"deadline_ms": 30, "best_effort": True}})
    assert err.value.status_code == 504


def _verifier_sessions(stack) -> int:
    with grpc.insecure_channel(stack.services["verifier"].address) as channel:
        return verifier_pb2_grpc.VerifierStub(channel).Info(common_pb2.InfoRequest()).sessions


def _metric(stack, name: str) -> float:
    for line in httpx.get(f"{stack.http_address}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_client_disconnect_mid_stream_frees_the_session(stack):
    cancelled = 'specserve_requests_finished_total{reason="cancelled"}'
    before = _metric(stack, cancelled)
    # Past EOS to 1000 tokens, so that the request cannot finish before the disconnect is seen.
    body = {"model": "tiny-target", "prompt": "def add(a, b):", "max_tokens": 1000, "temperature": 0.7,
            "seed": 1, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{stack.http_address}/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as response:
            assert response.status_code == 200
            next(response.iter_lines())
    deadline = time.monotonic() + 20
    while (_verifier_sessions(stack) or _metric(stack, cancelled) == before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _verifier_sessions(stack) == 0 and _metric(stack, cancelled) == before + 1


# Full integer ranges and subnormal floats, and the edges where int32 and int64 end.
_EDGES = st.sampled_from([2**31 - 1, 2**31, 2**63, 2**64, -(2**31) - 1, 5e-324, 1e-38, 1e-300])
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3000), st.integers(), _EDGES,
                    st.floats(-2, 3, allow_nan=False), st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True),
                    st.text(max_size=8), st.lists(st.integers(-1, 400), max_size=4), st.lists(st.text(max_size=3), max_size=2))
_BODIES = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny-target", "other", 3])},
    optional={k: _VALUES for k in ("prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
                                   "stream", "priority", "slo", "messages", "max_completion_tokens")})


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_BODIES, chat=st.booleans())
def test_fuzzed_bodies_get_a_2xx_or_an_openai_shaped_4xx(stack, body, chat):
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
        body["max_tokens"] = 8  # keep valid requests short; invalid values stay invalid
    url = f"{stack.http_address}/v1/{'chat/completions' if chat else 'completions'}"
    response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif body.get("stream") is True:
        assert response.text.rstrip().endswith("data: [DONE]")
    else:
        assert json.loads(response.text)["usage"]["completion_tokens"] >= 0
    assert httpx.get(f"{stack.http_address}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("field, value", [("max_tokens", 2**31), ("top_k", 2**31), ("max_tokens", 2**63),
                                          ("top_k", 2**40), ("max_completion_tokens", 2**31)])
def test_out_of_range_counts_are_a_400_naming_the_field(stack, field, value):
    body = {"model": "tiny-target", "messages": [{"role": "user", "content": "hi"}], field: value}
    response = httpx.post(f"{stack.http_address}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["param"]


def test_a_tiny_temperature_decodes_greedily(client):
    greedy = client.completions.create(model="tiny-target", prompt="def add(a, b):", max_tokens=6, temperature=0)
    tiny = client.completions.create(model="tiny-target", prompt="def add(a, b):", max_tokens=6, temperature=1e-38)
    assert tiny.choices[0].text == greedy.choices[0].text


def test_a_body_past_the_limit_is_a_413(stack):
    body = {"model": "tiny-target", "prompt": "x" * (5 << 20)}
    response = httpx.post(f"{stack.http_address}/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 413 and "exceeds" in response.json()["error"]["message"]


def test_metrics_follow_prometheus_conventions(client, stack):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-target", prompt="x", top_p=0.5, max_tokens=10**6)
    client.completions.create(model="tiny-target", prompt="x", max_tokens=2, temperature=0)
    text = httpx.get(f"{stack.http_address}/metrics", timeout=10).text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples.get('specserve_requests_rejected_total{reason="invalid_argument"}', 0) >= 1, text[:3000]
    assert samples["specserve_ttft_seconds_count"] >= 1 and 'specserve_tpot_seconds_bucket{le="0.005"}' in samples
    assert samples["specserve_drafter_available"] == 1.0 and "specserve_strategy_version" in samples
    assert "specserve_telemetry_dropped" in samples and "specserve_ops_invalid_total" in samples
    # The online corrections: positive ratios, the output share at most 1 (what finished requests
    # generated of their max_new_tokens).
    assert samples["specserve_step_time_scale"] > 0 and samples["specserve_ttft_scale"] > 0
    assert samples["specserve_draft_step_time_scale"] > 0
    assert 0 < samples["specserve_output_share"] <= 1
    assert not any(name.endswith("_ms") or "_ms_" in name for name in samples)


def test_unavailable_verifier_is_a_503(stack, client):
    stack.services["verifier"].kill()
    try:
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="tiny-target", prompt="x", max_tokens=2)
        assert err.value.status_code == 503
    finally:
        stack.restart("verifier", timeout_s=120)
