"""`specserve up` as a supervisor, with real processes and the tiny pair: services killed under load
come back, nothing outlives `up`, busy ports fail fast, and a dead policy leaves planning as it was."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from specserve.launcher import Stack, wait_healthy
from specserve.strategy import STRATEGY_KEY, CostModel, Strategy
from specserve.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.processes  # starts the services as processes

PROMPT = [5, 9, 11, 40, 2, 7]


def _generate(address: str, **sampling) -> gateway_pb2.GenerateResponse:
    with grpc.insecure_channel(address) as channel:
        request = gateway_pb2.GenerateRequest(prompt_token_ids={"ids": PROMPT}, sampling={"max_new_tokens": 24, **sampling})
        tokens, last = [], None
        for m in gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=60):
            tokens += m.token_ids
            last = m
        return tokens, last.stats


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_killed_drafter_and_policy_are_restarted_under_load(tiny_dir, redis_url):
    stack = Stack(str(tiny_dir[0]), str(tiny_dir[1]), redis_url, extra_env={"SPECSERVE_THREADS": "1"}).start(120)
    events: list[str] = []
    stack.supervise(on_event=events.append)
    reference, _ = _generate(stack.gateway_address)
    results, stop = [], threading.Event()

    def load() -> None:
        while not stop.is_set() and len(results) < 500:
            try:
                results.append(_generate(stack.gateway_address)[0])
            except grpc.RpcError as exc:
                results.append(exc)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        for name in ("drafter", "policy"):
            old = stack.services[name].proc
            old.send_signal(signal.SIGKILL)
            _wait(lambda: stack.services[name].proc is not old, 30, f"{name} to be restarted")
            if stack.services[name].address:
                wait_healthy(stack.services[name].address, 30, stack.services[name].proc)
            assert stack.services[name].proc.poll() is None
        import redis

        from specserve.ops import OPS_PREFIX

        redis.Redis.from_url(redis_url).set(OPS_PREFIX + "mode", "static")
        _wait(lambda: _generate(stack.gateway_address)[1].draft_tokens > 0, 30, "drafting to resume")
    finally:
        stop.set()
        worker.join()
        redis.Redis.from_url(redis_url).delete(OPS_PREFIX + "mode")
        stack.stop()
    assert len(results) >= 2 and all(r == reference for r in results), [r for r in results if r != reference][:2]
    assert sum("restarting" in e for e in events) == 2 and not stack.failed


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _up(tiny_dir, redis_url, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "specserve.cli", "up", "--target-model", str(tiny_dir[0]), "--draft-model",
         str(tiny_dir[1]), "--metrics-port", "0", *extra],
        env={**os.environ, "REDIS_URL": redis_url, "SPECSERVE_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def test_sigkill_of_up_leaves_no_service_behind(tiny_dir, redis_url):
    up = _up(tiny_dir, redis_url, "--port", "0", "--http-port", "0")
    try:
        for line in up.stdout:
            if "SpecServe is up" in line:
                break
        children = _children(up.pid)
        assert len(children) == 4, children  # verifier, drafter, policy, gateway
        up.send_signal(signal.SIGKILL)
        up.wait()
        _wait(lambda: not any(_alive(pid) for pid in children), 10, "the services to exit")
    finally:
        if up.poll() is None:
            up.kill()


def test_second_up_on_a_busy_port_exits_naming_it(tiny_dir, redis_url):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        up = _up(tiny_dir, redis_url, "--port", str(port), "--http-port", "0")
        out, _ = up.communicate(timeout=120)
    assert up.returncode != 0 and f"port {port}" in out, out


def test_a_dead_policy_does_not_turn_speculation_on(tiny_dir, redis_url, redis_client):
    """A policy (here: this test, writing the strategy document) found that the draft model's
    drafts do not pay, then goes away; once its strategy expires the gateway keeps planning plain
    decoding."""
    client = redis_client  # a flushed database: no strategy from an earlier test
    stack = Stack(str(tiny_dir[0]), str(tiny_dir[1]), redis_url, policy=False,
                  extra_env={"SPECSERVE_THREADS": "1", "SPECSERVE_PROPOSER": "draft_model"}).start(120)
    try:
        assert _generate(stack.gateway_address)[1].draft_tokens > 0  # the default strategy drafts
        dear = CostModel(draft_fixed=5000.0, draft_per_seq=0.0, verify_table=((1, 10.0), (2, 20.0), (4, 40.0)))
        # The policy's last word, already past its time-to-live: the policy is gone.
        client.set(STRATEGY_KEY, Strategy(mode="adaptive", cost=dear, version=7, issued_at=time.time() - 60,
                                          ttl_s=10.0, policy="test").to_json())
        _wait(lambda: _generate(stack.gateway_address)[1].draft_tokens == 0, 30, "the gateway to read the strategy")
        for _ in range(3):
            _, stats = _generate(stack.gateway_address)
            assert stats.draft_tokens == 0 and "cost model" in stats.speculation, stats.speculation
    finally:
        client.delete(STRATEGY_KEY)
        stack.stop()


def test_unknown_enums_and_undecodable_bytes_are_invalid_argument(tiny_dir, redis_url):
    stack = Stack(str(tiny_dir[0]), str(tiny_dir[1]), "", extra_env={"SPECSERVE_THREADS": "1"}).start(120)
    try:
        with grpc.insecure_channel(stack.gateway_address) as channel:
            raw = channel.unary_stream("/specserve.v1.Gateway/Generate")  # bytes in, bytes out
            valid = gateway_pb2.GenerateRequest(prompt="ab", sampling={"max_new_tokens": 2}).SerializeToString()
            assert len(list(raw(valid, timeout=30))) >= 1
            for payload, field in ((valid.replace(b"ab", b"\xff\xfe"), "request"),
                                   (b"\xff\xff\xff", "request"),
                                   (gateway_pb2.GenerateRequest(prompt="ab", speculation={"mode": 99}).SerializeToString(),
                                    "speculation.mode")):
                with pytest.raises(grpc.RpcError) as err:
                    list(raw(payload, timeout=30))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
                assert err.value.details().startswith(field), err.value.details()
    finally:
        stack.stop()
