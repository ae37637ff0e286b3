"""Start the whole system as local processes: Redis (if needed), verifier, drafter, policy, gateway.

Used by `specserve up` and by the integration tests, so both run exactly what compose runs: the
same entry points with the same SPECSERVE_* environment. Every child ends with the process that
started it (`specserve.lifeline`: it holds even when that process is SIGKILLed), each service
binds a free port itself where none is configured (the launcher reads the port it bound from its
log, so no other process can take it in between), and `Stack.supervise` restarts a service that
dies or stops answering its health checks, with backoff.
"""

from __future__ import annotations

import logging
import os
import re
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

from specserve import lifeline
from specserve.server import check_health, probe_health

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 60.0)  # waits before successive restarts of one service
MAX_RESTARTS = 5  # restarts of a required service within RESTART_WINDOW_S before the supervisor gives up
RESTART_WINDOW_S = 300.0
OPTIONAL = ("drafter", "policy")  # the system serves without these: they are restarted forever
LIVENESS_TIMEOUT_S = 60.0  # a service whose health service answers nothing this long is killed and restarted
LISTENING = re.compile(rb"listening on \S+:(\d+)")  # the line every service prints once it has bound a port
# The model services ask glibc for transparent huge pages on their large allocations (the weights
# llama.cpp repacks, the KV cache, torch's tensors): read by the loader at process start, so it is
# set here and in the image. With 4 KB pages the same decode ran 4-12% slower, more for the first
# of two processes started. A GLIBC_TUNABLES the user sets wins.
HUGE_PAGES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def huge_pages() -> dict[str, str]:
    """HUGE_PAGES, unless this environment sets GLIBC_TUNABLES itself."""
    return {} if "GLIBC_TUNABLES" in os.environ else dict(HUGE_PAGES)


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
    """A port free now; another process may take it before the caller's child binds it, so the
    services bind port 0 themselves (see `Service.ports`) and this is for peers that cannot."""
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
    log_offset: int = 0  # where this start's output begins in the (appended) log
    alive_at: float = 0.0  # when the process last answered a health check (or started)

    def start(self, log_dir: Path) -> None:
        self.log_path = log_dir / f"{self.name}.log"
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as out:  # the child has its own handle
            self.proc = lifeline.spawn(self.args, {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.alive_at = time.monotonic()

    def ports(self, count: int, timeout_s: float) -> list[int]:
        """The ports this start of the service bound, from the `listening on` lines of its log."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.log_path.open("rb") as f:
                f.seek(self.log_offset)
                found = [int(m) for m in LISTENING.findall(f.read())]
            if len(found) >= count:
                return found[:count]
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start-up: {failed_line(self.log_path.read_text(errors='replace'))}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} bound no port in {timeout_s:.0f}s")
            time.sleep(0.05)

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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def http_address(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 600.0, progress: Callable[[str], None] | None = None) -> "Stack":
        """Start every service and wait until each reports SERVING; a busy port fails at once. The
        model services bind free ports first, then the gateway starts with their addresses."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for port in (self.gateway_port, self.http_port, self.metrics_port):
            if port and not port_is_free(port):
                raise RuntimeError(f"port {port} is already in use (is another SpecServe running?)")
        py = sys.executable
        common = {"SPECSERVE_REDIS_URL": self.redis_url, **self.extra_env}
        roles = [("verifier", self.target_model), ("drafter", self.draft_model)]  # no draft model: never speculates
        try:
            models = [self._launch(Service(name, [py, "-m", f"services.{name}"],
                                           {**huge_pages(), **common, "SPECSERVE_MODEL": model, "SPECSERVE_PORT": "0"}),
                                           progress)
                      for name, model in roles if model]
            for spec in models:
                port = spec.ports(1, timeout_s)[0]
                spec.env["SPECSERVE_PORT"] = str(port)  # a restart binds the port the gateway knows
                spec.address = f"127.0.0.1:{port}"
            if self.policy and self.redis_url:
                self._launch(Service("policy", [py, "-m", "services.policy"], {**common}), progress)
            addresses = {spec.name: spec.address for spec in models}
            gateway = self._launch(Service("gateway", [py, "-m", "gateway"], {
                **common, "SPECSERVE_TOKENIZER": self.target_model, "SPECSERVE_VERIFIER": addresses["verifier"],
                "SPECSERVE_DRAFTER": addresses.get("drafter", ""), "SPECSERVE_HOST": "127.0.0.1",
                "SPECSERVE_PORT": str(self.gateway_port), "SPECSERVE_METRICS_PORT": str(self.metrics_port),
                "SPECSERVE_HTTP_PORT": str(self.http_port)}), progress)
            self.gateway_port, self.http_port = gateway.ports(2, timeout_s)
            gateway.env.update(SPECSERVE_PORT=str(self.gateway_port), SPECSERVE_HTTP_PORT=str(self.http_port))
            gateway.address = self.gateway_address
            for spec in self.services.values():
                if spec.address:
                    if progress:
                        progress(f"{spec.name}: serving on {spec.address} once loaded")
                    wait_healthy(spec.address, timeout_s, spec.proc, progress and (
                        lambda s, name=spec.name: progress(f"{name}: loading ({s:.0f} s)")))
        except Exception as exc:
            failed = next((s for s in self.services.values() if s.proc and s.proc.poll() is not None), None)
            self.stop()
            if failed is not None:
                raise RuntimeError(f"{failed.name} exited during start-up: {failed_line(self.logs(failed.name))}") from exc
            raise
        return self

    def _launch(self, spec: Service, progress: Callable[[str], None] | None) -> Service:
        spec.start(self.log_dir)
        self.services[spec.name] = spec
        if progress:
            progress(f"{spec.name}: started")
        return spec

    def supervise(self, on_event: Callable[[str], None] = log.warning, poll_s: float = 0.5,
                  liveness_timeout_s: float = LIVENESS_TIMEOUT_S, backoff_s: tuple[float, ...] = RESTART_BACKOFF_S) -> None:
        """Watch the services from a thread. A service that exits is restarted after a backoff; one
        whose health service has answered nothing (SERVING or not) for `liveness_timeout_s` (hung,
        or stopped by a signal) is killed and restarted. After MAX_RESTARTS within RESTART_WINDOW_S
        of a required service the supervisor gives up and sets `failed`; an optional one (drafter,
        policy: the gateway serves without them) is restarted forever at the longest backoff."""
        self.failed = ""
        self.restarts: dict[str, list[float]] = {name: [] for name in self.services}
        self._stopping = threading.Event()

        def check(name: str, spec: Service) -> bool:
            """Whether the service needs a restart; kills it when it stopped answering."""
            if spec.proc.poll() is not None:
                return True
            now = time.monotonic()
            if not spec.address or now - spec.alive_at < min(5.0, liveness_timeout_s / 3):
                return False
            if probe_health(spec.address, timeout_s=2) is not None:
                spec.alive_at = now
            elif now - spec.alive_at > liveness_timeout_s:
                on_event(f"{name} answered no health check for {now - spec.alive_at:.0f} s; killing it")
                spec.kill()
                return True
            return False

        def watch() -> None:
            while not self._stopping.wait(poll_s):
                for name, spec in list(self.services.items()):
                    if spec.proc is None or self._stopping.is_set() or not check(name, spec):
                        continue
                    now = time.monotonic()
                    recent = [t for t in self.restarts[name] if now - t < RESTART_WINDOW_S]
                    if len(recent) >= MAX_RESTARTS and name not in OPTIONAL:
                        self.failed = (f"{name} died {len(recent) + 1} times in {RESTART_WINDOW_S:.0f} s "
                                       f"(last: {failed_line(self.logs(name))}); giving up")
                        on_event(self.failed)
                        return
                    wait = backoff_s[min(len(recent), len(backoff_s) - 1)]
                    on_event(f"{name} exited with code {spec.proc.returncode}; restarting in {wait:.0f} s "
                             f"(restart {len(recent) + 1})")
                    if self._stopping.wait(wait):
                        return
                    with self._lock:
                        if self._stopping.is_set():
                            return
                        self.restarts[name] = [*recent, time.monotonic()]
                        spec.start(self.log_dir)

        self.supervisor = threading.Thread(target=watch, name="supervisor", daemon=True)
        self.supervisor.start()

    def restart(self, name: str, timeout_s: float = 300.0) -> None:
        spec = self.services[name]
        spec.stop()
        spec.start(self.log_dir)
        if spec.address:
            wait_healthy(spec.address, timeout_s, spec.proc)

    def stop(self) -> None:
        with self._lock:  # a restart under way finishes first; none starts after this
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
    """An embedded Redis for a machine without one: `redis-server` from the PATH, following this
    process's lifeline. Without a port, a free one (another free one if that is taken meanwhile)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("no Redis reachable and no redis-server on the PATH; set REDIS_URL")
    for _ in range(1 if port else 3):
        chosen = port or free_port()
        proc = lifeline.spawn([sys.executable, "-m", "specserve.lifeline", "--", binary, "--port", str(chosen),
                               "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], dict(os.environ),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"redis://127.0.0.1:{chosen}/0"
        deadline = time.monotonic() + 10
        while not redis_reachable(url) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None and redis_reachable(url):
            return url, proc
        proc.kill()
        proc.wait()
    raise RuntimeError("redis-server did not start")
