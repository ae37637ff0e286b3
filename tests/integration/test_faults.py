"""Faults under steady load, with real processes and a Redis of the test's own: nothing is lost or
corrupted (greedy output still equals the reference), and nothing hangs."""

import signal
import threading
import time

import grpc
import pytest
import redis

from specserve.launcher import Stack, free_port, start_redis
from specserve.telemetry import STREAM
from specserve.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.processes  # starts the services as processes

PROMPT = [17, 18, 19, 20, 21]


def _generate(address: str, n: int = 24, timeout: float = 60) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        out = []
        for m in gateway_pb2_grpc.GatewayStub(channel).Generate(
                gateway_pb2.GenerateRequest(prompt_token_ids={"ids": PROMPT}, sampling={"max_new_tokens": n}),
                timeout=timeout):
            out += m.token_ids
        return out


class Load:
    """Sends the same greedy request over and over from a few threads and records every outcome."""

    def __init__(self, address: str, threads: int = 3):
        self.address, self.stop, self.results = address, threading.Event(), []
        self.threads = [threading.Thread(target=self._loop) for _ in range(threads)]

    def _loop(self):
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.results.append(("ok", _generate(self.address), time.monotonic() - started))
            except grpc.RpcError as exc:
                self.results.append((exc.code().name, exc.details(), time.monotonic() - started))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)


@pytest.fixture
def fault_stack(tiny_dir):
    port = free_port()
    url, proc = start_redis(port)
    target, draft = tiny_dir
    s = Stack(str(target), str(draft), url, extra_env={"SPECSERVE_THREADS": "1"}).start(timeout_s=120)
    state = {"redis": proc, "port": port, "url": url}
    yield s, state
    s.stop()
    state["redis"].terminate()


def test_redis_down_and_back(fault_stack):
    stack, state = fault_stack
    reference = _generate(stack.gateway_address)
    client = redis.Redis.from_url(state["url"])
    with Load(stack.gateway_address) as load:
        _until(lambda: len(load.results) >= 2)
        state["redis"].terminate()
        state["redis"].wait()
        served = len(load.results)
        _until(lambda: len(load.results) >= served + 3)  # requests go on being served without Redis
        _, state["redis"] = start_redis(state["port"])
        _until(lambda: client.xlen(STREAM) > 0)  # telemetry resumed on the new (empty) server
        served = len(load.results)
        _until(lambda: len(load.results) > served)
    assert load.results and all(r[0] == "ok" and r[1] == reference for r in load.results), load.results[:3]


def test_verifier_restart_fails_in_flight_promptly_then_serves(fault_stack):
    stack, _ = fault_stack
    reference = _generate(stack.gateway_address)
    with Load(stack.gateway_address) as load:
        _until(lambda: len(load.results) >= 2)
        stack.services["verifier"].kill()
        _until(lambda: any(r[0] != "ok" for r in load.results))
        load.stop.set()
    failures = [r for r in load.results if r[0] != "ok"]
    assert all(r[0] == "UNAVAILABLE" and r[2] < 10 for r in failures), failures
    assert all(r[1] == reference for r in load.results if r[0] == "ok")
    stack.restart("verifier", timeout_s=120)
    _until(lambda: _generate_or_none(stack.gateway_address) == reference, 20)


def _health(stack) -> int:
    import httpx

    return httpx.get(f"{stack.http_address}/health", timeout=5).status_code


def _until(condition, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_readiness_follows_the_verifier(fault_stack):
    stack, _ = fault_stack
    assert _health(stack) == 200
    stack.services["verifier"].kill()
    _until(lambda: _health(stack) == 503)  # within a few seconds: load balancers stop sending
    with grpc.insecure_channel(stack.gateway_address) as channel:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "verifier restarted" not in stack.logs("gateway")
    stack.restart("verifier", timeout_s=120)
    _until(lambda: _health(stack) == 200)
    # A new verifier instance holds no prefix cache: the gateway stops pricing prompts as cached there.
    _until(lambda: "verifier restarted" in stack.logs("gateway"))


def test_sigterm_drains_http_streams_and_refuses_new_requests(tiny_dir):
    """A stream in flight when the gateway is told to stop finishes with every token; a request
    sent during the drain gets 503; then the gateway exits."""
    import json

    import httpx

    url, proc = start_redis(free_port())
    target, _ = tiny_dir
    # A verifier slowed to ~20 ms a step, so a 120-token stream is still running when the signal lands.
    stack = Stack(str(target), "", url, extra_env={"SPECSERVE_THREADS": "1", "SPECSERVE_STEP_DELAY_MS": "20"}
                  ).start(timeout_s=120)
    try:
        model = httpx.get(f"{stack.http_address}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "prompt": PROMPT, "max_tokens": 120, "temperature": 0, "stream": True}
        tokens, finish, started = [], [], threading.Event()

        def stream():
            with httpx.stream("POST", f"{stack.http_address}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        for choice in chunk.get("choices", []):
                            if choice.get("text"):
                                tokens.append(choice["text"])
                                started.set()
                            if choice.get("finish_reason"):
                                finish.append(choice["finish_reason"])

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        gateway = stack.services["gateway"].proc
        gateway.send_signal(signal.SIGTERM)
        _until(lambda: _health(stack) == 503, 10)
        refused = httpx.post(f"{stack.http_address}/v1/completions", json={**body, "stream": False}, timeout=10)
        assert refused.status_code == 503
        reader.join(60)
        # The stream ran to its own end (its length, or the tiny model's end of text), not cut short.
        assert len(finish) == 1 and finish[0] in ("length", "stop") and tokens
        assert gateway.wait(30) == 0
    finally:
        stack.stop()
        proc.terminate()


def _verifier_sessions(stack) -> int:
    from specserve.v1 import common_pb2, verifier_pb2_grpc

    with grpc.insecure_channel(stack.services["verifier"].address) as channel:
        return verifier_pb2_grpc.VerifierStub(channel).Info(common_pb2.InfoRequest(), timeout=10).sessions


def _stream_until_first_token(address: str, n: int):
    """A long greedy stream on a thread; returns once its first token has arrived."""
    first = threading.Event()

    def run():
        try:
            with grpc.insecure_channel(address) as channel:
                for _ in gateway_pb2_grpc.GatewayStub(channel).Generate(
                        gateway_pb2.GenerateRequest(prompt_token_ids={"ids": PROMPT}, sampling={"max_new_tokens": n}),
                        timeout=120):
                    first.set()
        except grpc.RpcError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert first.wait(60), "no first token"
    return thread


def test_a_restarted_gateway_frees_the_sessions_its_crashed_run_left(tiny_dir):
    target, draft = tiny_dir
    # A slowed verifier, so a long stream is still running when the gateway dies.
    stack = Stack(str(target), str(draft), "", extra_env={"SPECSERVE_THREADS": "1", "SPECSERVE_STEP_DELAY_MS": "20"}
                  ).start(timeout_s=120)
    try:
        _stream_until_first_token(stack.gateway_address, 200)
        stack.services["gateway"].kill()  # SIGKILL: nothing released on the way out
        assert _verifier_sessions(stack) >= 1
        stack.restart("gateway", timeout_s=120)  # same instance name (hostname and port)
        assert _verifier_sessions(stack) == 0
    finally:
        stack.stop()


def test_a_stopped_verifier_fails_requests_within_a_bound_and_is_restarted(tiny_dir):
    from specserve.server import probe_health

    target, _ = tiny_dir
    stack = Stack(str(target), "", "", extra_env={"SPECSERVE_THREADS": "1", "SPECSERVE_CALL_TIMEOUT_S": "3"}
                  ).start(timeout_s=120)
    events: list[str] = []
    try:
        reference = _generate(stack.gateway_address)
        stopped = stack.services["verifier"].proc
        stopped.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            _generate(stack.gateway_address, timeout=120)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), err.value
        assert time.monotonic() - started < 60  # three timed-out steps, not the client's deadline
        assert probe_health(stack.gateway_address, timeout_s=5) is not None  # the gateway still answers
        stack.supervise(on_event=events.append, liveness_timeout_s=5)
        _until(lambda: stack.services["verifier"].proc is not stopped, 60)
        assert stopped.wait(10) == -signal.SIGKILL and any("answered no health check" in e for e in events), events
        _until(lambda: _generate_or_none(stack.gateway_address) == reference, 120)
    finally:
        stack.stop()


def _generate_or_none(address: str):
    try:
        return _generate(address)
    except grpc.RpcError:
        return None
