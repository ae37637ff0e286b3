"""Start the whole system as local processes: Redis (if needed), verifier, drafter, policy, gateway.

Used by `specserve up` and by the integration tests, so both run exactly what compose runs: the
same entry points with the same SPECSERVE_* environment. Every child dies with the process that
started it (a parent-death signal, which holds even when that process is SIGKILLed), and
`Stack.supervise` restarts a service that dies, with backoff, until it keeps failing.
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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from specserve.server import check_health

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl option: the signal a child gets when its parent dies
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0)  # waits before successive restarts of one service
MAX_RESTARTS = 5  # restarts of one service within RESTART_WINDOW_S before the supervisor gives up
RESTART_WINDOW_S = 300.0


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent goes, so no service outlives `up`."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind the port now. Servers bind with address reuse (grpc, uvicorn and
    our HTTP front do), so connections of an earlier run in TIME_WAIT do not make it busy."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(address: str, timeout_s: float, proc: subprocess.Popen | None = None,
                 progress: Callable[[float], None] | None = None) -> None:
    """Poll the standard gRPC health service until it says SERVING, from `proc` itself: a process
    that exited fails this even if something else answers on its port. `progress` gets the seconds
    waited, every few seconds."""
    started = time.monotonic()
    reported = started
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process for {address} exited with code {proc.returncode}")
        if check_health(address, timeout_s=2) and (proc is None or proc.poll() is None):
            return
        now = time.monotonic()
        if now - started > timeout_s:
            raise TimeoutError(f"{address} not healthy after {timeout_s:.0f}s")
        if progress is not None and now - reported >= 5:
            progress(now - started)
            reported = now
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
        self.proc = subprocess.Popen(self.args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)

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
        ]
        if self.draft_model:  # no draft model: a stack that never speculates
            specs.append(Service("drafter", [py, "-m", "services.drafter"],
                                 {**common, "SPECSERVE_MODEL": self.draft_model, "SPECSERVE_PORT": str(dport)},
                                 f"127.0.0.1:{dport}"))
        if self.policy and self.redis_url:
            specs.append(Service("policy", [py, "-m", "services.policy"], {**common}))
        specs.append(Service(
            "gateway", [py, "-m", "gateway"],
            {**common, "SPECSERVE_TOKENIZER": self.target_model, "SPECSERVE_VERIFIER": f"127.0.0.1:{vport}",
             "SPECSERVE_DRAFTER": f"127.0.0.1:{dport}" if self.draft_model else "", "SPECSERVE_HOST": "127.0.0.1",
             "SPECSERVE_PORT": str(self.gateway_port), "SPECSERVE_METRICS_PORT": str(self.metrics_port),
             "SPECSERVE_HTTP_PORT": str(self.http_port)},
            self.gateway_address))
        return specs

    def start(self, timeout_s: float = 600.0, progress: Callable[[str], None] | None = None) -> "Stack":
        """Start every service and wait until each reports SERVING; a busy port fails at once."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        specs = self.service_specs()
        for port in (self.gateway_port, self.http_port, self.metrics_port):
            if port and not port_is_free(port):
                raise RuntimeError(f"port {port} is already in use (is another SpecServe running?)")
        for spec in specs:
            spec.start(self.log_dir)
            self.services[spec.name] = spec
            if progress:
                progress(f"{spec.name}: started" + (f", will serve on {spec.address}" if spec.address else ""))
        try:
            for spec in self.services.values():
                if spec.address:
                    wait_healthy(spec.address, timeout_s, spec.proc, progress and (
                        lambda s, name=spec.name: progress(f"{name}: loading ({s:.0f} s)")))
        except Exception as exc:
            failed = next((s for s in self.services.values() if s.proc and s.proc.poll() is not None), None)
            self.stop()
            if failed is not None:
                last = failed_line(self.logs(failed.name))
                raise RuntimeError(f"{failed.name} exited during start-up: {last}") from exc
            raise
        return self

    def supervise(self, on_event: Callable[[str], None] = log.warning, poll_s: float = 0.5) -> None:
        """Watch the services from a thread: a service that dies is restarted after a backoff; after
        MAX_RESTARTS within RESTART_WINDOW_S the supervisor gives up and sets `failed`."""
        self.failed = ""
        self.restarts: dict[str, list[float]] = {name: [] for name in self.services}
        self._stopping = threading.Event()

        def watch() -> None:
            while not self._stopping.wait(poll_s):
                for name, spec in list(self.services.items()):
                    if spec.proc is None or spec.proc.poll() is None or self._stopping.is_set():
                        continue
                    now = time.monotonic()
                    recent = [t for t in self.restarts[name] if now - t < RESTART_WINDOW_S]
                    if len(recent) >= MAX_RESTARTS:
                        self.failed = (f"{name} died {len(recent) + 1} times in {RESTART_WINDOW_S:.0f} s "
                                       f"(last: {failed_line(self.logs(name))}); giving up")
                        on_event(self.failed)
                        return
                    wait = RESTART_BACKOFF_S[min(len(recent), len(RESTART_BACKOFF_S) - 1)]
                    on_event(f"{name} exited with code {spec.proc.returncode}; restarting in {wait:.0f} s "
                             f"(restart {len(recent) + 1})")
                    if self._stopping.wait(wait):
                        return
                    self.restarts[name] = [*recent, time.monotonic()]
                    spec.start(self.log_dir)

        threading.Thread(target=watch, name="supervisor", daemon=True).start()

    def restart(self, name: str, timeout_s: float = 300.0) -> None:
        spec = self.services[name]
        spec.stop()
        spec.start(self.log_dir)
        if spec.address:
            wait_healthy(spec.address, timeout_s, spec.proc)

    def stop(self) -> None:
        if getattr(self, "_stopping", None) is not None:
            self._stopping.set()
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


def failed_line(log_text: str) -> str:
    """The line of a service's log that says why it stopped: the last error, else the last line."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line or "cannot" in line]
    return (errors or lines or ["(no output)"])[-1][:300]


def start_redis(port: int | None = None) -> tuple[str, subprocess.Popen | None]:
    """An embedded Redis for a machine without one: `redis-server` from the PATH."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("no Redis reachable and no redis-server on the PATH; set REDIS_URL")
    port = port or free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not redis_reachable(url):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("redis-server did not start")
        time.sleep(0.1)
    return url, proc
