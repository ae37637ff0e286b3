"""Start the whole system as local processes: Redis (if needed), verifier, drafter, policy, gateway.

Used by `specserve up` and by the integration tests, so both run exactly what compose runs: the
same entry points with the same SPECSERVE_* environment.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from specserve.server import check_health

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(address: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll the standard gRPC health service until it says SERVING."""
    deadline = time.monotonic() + timeout_s
    while not check_health(address, timeout_s=2):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {address} exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address} not healthy after {timeout_s:.0f}s")
        time.sleep(0.3)


def redis_reachable(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except (redis.RedisError, ValueError):
        return False


@dataclass
class Service:
    name: str
    args: list[str]
    env: dict[str, str]
    address: str = ""  # gRPC address to health-check; empty for non-gRPC services
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def start(self, log_dir: Path) -> None:
        self.log_path = log_dir / f"{self.name}.log"
        out = self.log_path.open("ab")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Stack:
    """A running system. `services` are in start order; stop() reverses it."""

    target_model: str
    draft_model: str
    redis_url: str = ""
    gateway_port: int = 0
    metrics_port: int = 0
    http_port: int = 0  # the OpenAI-compatible HTTP API; 0 picks a free one
    extra_env: dict[str, str] = field(default_factory=dict)
    policy: bool = True
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="specserve-")))
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def http_address(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def service_specs(self) -> list[Service]:
        py = sys.executable
        vport, dport = free_port(), free_port()
        self.gateway_port = self.gateway_port or free_port()
        self.http_port = self.http_port or free_port()
        common = {"SPECSERVE_REDIS_URL": self.redis_url, **self.extra_env}
        specs = [
            Service("verifier", [py, "-m", "services.verifier"],
                    {**common, "SPECSERVE_MODEL": self.target_model, "SPECSERVE_PORT": str(vport)}, f"127.0.0.1:{vport}"),
            Service("drafter", [py, "-m", "services.drafter"],
                    {**common, "SPECSERVE_MODEL": self.draft_model, "SPECSERVE_PORT": str(dport)}, f"127.0.0.1:{dport}"),
        ]
        if self.policy and self.redis_url:
            specs.append(Service("policy", [py, "-m", "services.policy"], {**common}))
        specs.append(Service(
            "gateway", [py, "-m", "gateway"],
            {**common, "SPECSERVE_TOKENIZER": self.target_model, "SPECSERVE_VERIFIER": f"127.0.0.1:{vport}",
             "SPECSERVE_DRAFTER": f"127.0.0.1:{dport}", "SPECSERVE_HOST": "127.0.0.1",
             "SPECSERVE_PORT": str(self.gateway_port), "SPECSERVE_METRICS_PORT": str(self.metrics_port),
             "SPECSERVE_HTTP_PORT": str(self.http_port)},
            self.gateway_address))
        return specs

    def start(self, timeout_s: float = 600.0) -> "Stack":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for spec in self.service_specs():
            spec.start(self.log_dir)
            self.services[spec.name] = spec
        try:
            for spec in self.services.values():
                if spec.address:
                    wait_healthy(spec.address, timeout_s, spec.proc)
        except Exception:
            self.stop()
            raise
        return self

    def restart(self, name: str, timeout_s: float = 300.0) -> None:
        spec = self.services[name]
        spec.stop()
        spec.start(self.log_dir)
        if spec.address:
            wait_healthy(spec.address, timeout_s, spec.proc)

    def stop(self) -> None:
        for spec in reversed(list(self.services.values())):
            spec.stop()

    def model_infos(self) -> dict:
        """Info of the running verifier and drafter (runtime, model file, dtype), by name."""
        import grpc

        from specserve.v1 import common_pb2, drafter_pb2_grpc, verifier_pb2_grpc

        stubs = {"verifier": verifier_pb2_grpc.VerifierStub, "drafter": drafter_pb2_grpc.DrafterStub}
        out = {}
        for name, stub in stubs.items():
            if name in self.services:
                with grpc.insecure_channel(self.services[name].address) as channel:
                    out[name] = stub(channel).Info(common_pb2.InfoRequest(), timeout=10)
        return out

    def logs(self, name: str) -> str:
        path = self.services[name].log_path
        return path.read_text(errors="replace") if path and path.exists() else ""


def start_redis(port: int | None = None) -> tuple[str, subprocess.Popen | None]:
    """An embedded Redis for a machine without one: `redis-server` from the PATH."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("no Redis reachable and no redis-server on the PATH; set REDIS_URL")
    port = port or free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not redis_reachable(url):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("redis-server did not start")
        time.sleep(0.1)
    return url, proc
