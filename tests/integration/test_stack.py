"""All services as real processes with the tiny pair: concurrency, cancellation, drafter failure."""

import os
import random
import threading
import time
from dataclasses import replace

import grpc
import pytest

from specserve.launcher import HUGE_PAGES, Stack
from specserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, verifier_pb2_grpc
from tests.helpers import assert_lossless

pytestmark = pytest.mark.processes  # starts the services as processes


@pytest.fixture(scope="module", params=["torch", "llama.cpp"])
def stack(request, tiny_dir):
    target, draft = tiny_dir
    env = {"SPECSERVE_THREADS": "1", "SPECSERVE_RUNTIME": request.param}
    s = Stack(str(target), str(draft), extra_env=env).start(timeout_s=120)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(stack, tiny_models):
    """Target-only greedy output (and top-2 gaps) on the stack's runtime, stopping where the
    verifier says a sequence ends."""
    with grpc.insecure_channel(stack.services["verifier"].address) as channel:
        eos = list(verifier_pb2_grpc.VerifierStub(channel).Info(common_pb2.InfoRequest()).eos_token_ids)
    pair = replace(tiny_models, runtime=stack.extra_env["SPECSERVE_RUNTIME"])
    return lambda prompt, n: pair.reference(prompt, n, eos)


def _generate(address: str, request: gateway_pb2.GenerateRequest) -> tuple[list[int], gateway_pb2.GenerateResponse]:
    with grpc.insecure_channel(address) as channel:
        tokens, last = [], None
        for m in gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=120):
            tokens += m.token_ids
            last = m
        return tokens, last


def _run_concurrently(fn, args_list):
    results = [None] * len(args_list)

    def run(i, args):
        results[i] = fn(*args)

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _requests(n: int, seed: int):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        ids = [rng.randrange(3, 300) for _ in range(rng.randrange(2, 50))]
        sampling = {"max_new_tokens": rng.randrange(4, 40)}
        if i % 3 == 2:
            sampling |= {"temperature": 0.8, "top_p": 0.9, "seed": i}
        reqs.append(gateway_pb2.GenerateRequest(prompt_token_ids={"ids": ids}, sampling=sampling))
    return reqs


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.decode().partition("=")[::2] for item in f.read().split(b"\0") if item)


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads a process's environment from /proc")
def test_model_services_ask_for_huge_pages(stack):
    # The launcher's own environment decides: a GLIBC_TUNABLES set there is passed on unchanged.
    expected = os.environ.get("GLIBC_TUNABLES", HUGE_PAGES["GLIBC_TUNABLES"])
    for name in ("verifier", "drafter"):
        assert _environ(stack.services[name].proc.pid).get("GLIBC_TUNABLES") == expected, name


def test_concurrent_streams_match_target_only(stack, reference):
    reqs = _requests(9, seed=3)
    results = _run_concurrently(_generate, [(stack.gateway_address, r) for r in reqs])
    for req, (tokens, last) in zip(reqs, results):
        assert last.stats.output_tokens == len(tokens) > 0
        if req.sampling.temperature == 0:
            assert_lossless(tokens, reference(list(req.prompt_token_ids.ids), req.sampling.max_new_tokens))


def _verifier_sessions(stack) -> int:
    with grpc.insecure_channel(stack.services["verifier"].address) as channel:
        return verifier_pb2_grpc.VerifierStub(channel).Info(common_pb2.InfoRequest()).sessions


def test_cancelled_streams_release_their_sessions(stack):
    before = _verifier_sessions(stack)
    with grpc.insecure_channel(stack.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for _ in range(3):
            call = stub.Generate(gateway_pb2.GenerateRequest(prompt="def add(a, b):", sampling={"max_new_tokens": 500}))
            next(call)
            call.cancel()
    deadline = time.monotonic() + 10
    while _verifier_sessions(stack) > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _verifier_sessions(stack) <= before


def test_killing_the_drafter_loses_nothing(stack, reference):
    reqs = [r for r in _requests(8, seed=5) if r.sampling.temperature == 0]
    for r in reqs:
        r.sampling.max_new_tokens = 60
    drafter = stack.services["drafter"].proc
    after_kill: list[int] = []

    def generate_and_kill(address, request):
        """The first request kills the drafter at its first token, so every request is in flight."""
        with grpc.insecure_channel(address) as channel:
            tokens, last = [], None
            for m in gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=120):
                if not tokens:
                    drafter.kill()
                elif drafter.poll() is not None:
                    after_kill.extend(m.token_ids)
                tokens += m.token_ids
                last = m
            return tokens, last

    results = _run_concurrently(lambda address, request, i: (generate_and_kill if i == 0 else _generate)(address, request),
                                [(stack.gateway_address, r, i) for i, r in enumerate(reqs)])
    assert drafter.wait(10) == -9 and after_kill  # killed with the first request still streaming
    for req, (tokens, _) in zip(reqs, results):
        assert_lossless(tokens, reference(list(req.prompt_token_ids.ids), 60))
    stack.restart("drafter", timeout_s=120)
    tokens, last = _generate(stack.gateway_address, reqs[0])
    assert tokens == results[0][0]
