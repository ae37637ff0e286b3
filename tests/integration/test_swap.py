"""End to end through the real services: any program that writes the strategy document drives the
gateway, and sampled output follows the target's distribution."""

import asyncio
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from specserve.contracts import SamplingParams
from specserve.launcher import Stack
from specserve.runtime import Row, open_runtime
from specserve.sampling import processed_probs
from specserve.strategy import STRATEGY_KEY
from specserve.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.processes  # starts the services as processes

PROMPT = [5, 9, 11, 40, 2]


@pytest.fixture(scope="module")
def stack(tiny_dir, redis_url):
    s = Stack(str(tiny_dir[0]), str(tiny_dir[1]), redis_url, policy=False, extra_env={"SPECSERVE_THREADS": "1"})
    yield s.start(120)
    s.stop()


def _stats(address: str) -> gateway_pb2.GenerateStats:
    with grpc.insecure_channel(address) as channel:
        request = gateway_pb2.GenerateRequest(prompt_token_ids={"ids": PROMPT}, sampling={"max_new_tokens": 12})
        return list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=60))[-1].stats


def _until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"


def test_a_minimal_external_policy_drives_the_gateway(stack, redis_url):
    program = Path(__file__).with_name("minimal_policy.py")
    for mode, k, drafts in (("static", 2, True), ("off", 0, False)):
        policy = subprocess.Popen([sys.executable, str(program), redis_url, mode, str(k)])
        try:
            _until(lambda: (_stats(stack.gateway_address).draft_tokens > 0) == drafts, 30, f"mode {mode}")
        finally:
            policy.kill()
            policy.wait()
    import redis

    redis.Redis.from_url(redis_url).delete(STRATEGY_KEY)


def test_sampled_output_follows_the_target_distribution(stack, tiny_dir, redis_url):
    """The first two sampled tokens of 400 seeded requests (the second one through a verify step
    with three drafts) against the target's exact joint distribution, by total variation."""
    import redis

    redis.Redis.from_url(redis_url).set("specserve:ops:mode", "static")
    params = SamplingParams(temperature=1.0, top_k=3)
    target = open_runtime(str(tiny_dir[0]), max_sessions=4, kv_tokens=512)  # the verifier's runtime
    first = processed_probs(target.forward([Row("p", PROMPT, [len(PROMPT) - 1])])[0], params)[0]
    joint = {}
    for t1 in first.nonzero().squeeze(1).tolist():
        target.release("q")
        second = processed_probs(target.forward([Row("q", [*PROMPT, t1], [len(PROMPT)])])[0], params)[0]
        for t2 in second.nonzero().squeeze(1).tolist():
            joint[(t1, t2)] = float(first[t1] * second[t2])

    async def sample(n: int) -> list[tuple[int, ...]]:
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)

            async def one(seed: int) -> tuple[int, ...]:
                request = gateway_pb2.GenerateRequest(prompt_token_ids={"ids": PROMPT}, sampling={
                    "max_new_tokens": 2, "temperature": 1.0, "top_k": 3, "seed": seed})
                tokens: list[int] = []
                async for message in stub.Generate(request, timeout=120):
                    tokens += message.token_ids
                return tuple(tokens)

            out = []
            for start in range(0, n, 25):
                out += await asyncio.gather(*(one(s) for s in range(start, start + 25)))
            return out

    try:
        draws = asyncio.run(sample(400))
    finally:
        redis.Redis.from_url(redis_url).delete("specserve:ops:mode")
    counts = Counter(draws)
    tv = 0.5 * sum(abs(counts.get(k, 0) / len(draws) - p) for k, p in joint.items())
    tv += 0.5 * sum(c / len(draws) for k, c in counts.items() if k not in joint)
    assert tv < 0.12, (tv, counts, joint)
