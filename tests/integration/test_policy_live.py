"""Policy, telemetry and ops keys with real processes and a real Redis."""

import json
import subprocess
import sys
import time

import grpc
import pytest
import redis

from specserve.launcher import Service, Stack
from specserve.ops import OPS_PREFIX
from specserve.strategy import STRATEGY_KEY, Strategy
from specserve.telemetry import STREAM
from specserve.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.processes  # starts the services as processes


@pytest.fixture(scope="module")
def live_stack(tiny_dir, redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    target, draft = tiny_dir
    s = Stack(str(target), str(draft), redis_url, extra_env={"SPECSERVE_THREADS": "1"}).start(timeout_s=120)
    yield s, client
    s.stop()
    client.flushdb()


def _generate(address: str, ids: list[int], n: int = 20) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        out = []
        for m in stub.Generate(gateway_pb2.GenerateRequest(prompt_token_ids={"ids": ids}, sampling={"max_new_tokens": n})):
            out += m.token_ids
        return out


def _wait(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _last_mode(client) -> str:
    """The strategy mode of the gateway's latest step record."""
    for _, fields in client.xrevrange(STREAM, count=50):
        if fields.get(b"component") == b"gateway":
            return fields[b"mode"].decode()
    return ""


def test_every_component_emits_step_records(live_stack):
    stack, client = live_stack
    _generate(stack.gateway_address, [1, 2, 3])
    assert _wait(lambda: {f[b"component"] for _, f in client.xrevrange(STREAM, count=200)}
                 >= {b"gateway", b"verifier", b"drafter"})


def test_telemetry_flows_and_the_policy_publishes(live_stack):
    stack, client = live_stack
    reference = _generate(stack.gateway_address, [5, 6, 7, 8])
    assert _wait(lambda: client.xlen(STREAM) > 0)
    assert _wait(lambda: client.get(STRATEGY_KEY) is not None)
    strategy = Strategy.from_json(client.get(STRATEGY_KEY))
    assert strategy.mode == "adaptive" and strategy.policy.startswith("specserve-policy")
    # Ops keys: a valid value takes effect; garbage is ignored and counted.
    invalid = _invalid_ops(stack)
    subprocess.run([sys.executable, "-m", "specserve.cli", "ops", "--redis-url", stack.redis_url,
                    "set", "mode", "static"], check=True)
    client.set("specserve:ops:static_k", "banana")
    outputs = []
    assert _wait(lambda: outputs.append(_generate(stack.gateway_address, [5, 6, 7, 8])) or _last_mode(client) == "static")
    assert all(out == reference for out in outputs)
    assert _wait(lambda: _invalid_ops(stack) > invalid)
    client.delete("specserve:ops:mode", "specserve:ops:static_k")


def _invalid_ops(stack) -> float:
    import httpx

    for line in httpx.get(f"{stack.http_address}/metrics", timeout=10).text.splitlines():
        if line.startswith("specserve_ops_invalid_total "):
            return float(line.split()[-1])
    return 0.0


def test_hot_swap_policy_under_traffic(live_stack):
    stack, client = live_stack
    reference = _generate(stack.gateway_address, [9, 10, 11])
    stack.services["policy"].stop()
    assert _generate(stack.gateway_address, [9, 10, 11]) == reference  # strategy kept while the policy is away
    swapped = Service("policy", [sys.executable, "-m", "services.policy"],
                      {"SPECSERVE_REDIS_URL": stack.redis_url, "SPECSERVE_ALGORITHM": "smartspec"})
    swapped.start(stack.log_dir)
    stack.services["policy"] = swapped
    assert _wait(lambda: json.loads(client.get(STRATEGY_KEY))["mode"] == "smartspec")
    outputs = []
    assert _wait(lambda: outputs.append(_generate(stack.gateway_address, [9, 10, 11])) or _last_mode(client) == "smartspec")
    assert all(out == reference for out in outputs)


def test_the_ops_key_max_plain_steps_sets_the_decode_bursts_live(live_stack):
    stack, client = live_stack

    def latest_forwards() -> list[int]:
        """Generate once; the forwards per verify call of the gateway's latest three plain decode
        steps (the telemetry arrives in batches, so these may be an earlier request's)."""
        _generate(stack.gateway_address, [5, 6, 7, 8], n=24)
        records = [f for _, f in client.xrevrange(STREAM, count=200)
                   if f.get(b"component") == b"gateway" and not int(f[b"prompt_tokens"])]
        return [int(f[b"forwards"]) for f in records[:3]]

    client.set(OPS_PREFIX + "mode", "off")  # plain decoding: every step may be a burst
    try:
        assert _wait(lambda: max(latest_forwards(), default=0) > 6, timeout_s=60)  # the default, 16
        client.set(OPS_PREFIX + "max_plain_steps", "1")
        assert _wait(lambda: latest_forwards() == [1, 1, 1], timeout_s=60)
        client.set(OPS_PREFIX + "max_plain_steps", "6")
        assert _wait(lambda: 1 < max(forwards := latest_forwards()) <= 6 and len(forwards) == 3, timeout_s=60)
    finally:
        client.delete(OPS_PREFIX + "mode", OPS_PREFIX + "max_plain_steps")
