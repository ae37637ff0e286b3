"""Each compose service's command and environment, run as a process on this machine."""

import re
import sys
from pathlib import Path

import pytest
import yaml

from specserve.launcher import Service, free_port, wait_healthy

pytestmark = pytest.mark.processes  # starts the services as processes

ROOT = Path(__file__).resolve().parents[2]


def test_every_compose_service_starts_locally_and_becomes_healthy(tiny_dir, redis_url, tmp_path):
    """Each service's command and environment from the compose file, with the compose network's
    names mapped to this machine (model folders to the tiny pair, hosts to loopback, ports to free ones)."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    target, draft = tiny_dir
    ports = {p: str(free_port()) for p in ("50051", "50052", "50053", "9464", "8000")}
    subst = [
        ("/models/specserve/models/qwen2.5-coder-1.5b-instruct", str(target)),
        ("/models/specserve/models/qwen2.5-coder-0.5b-instruct", str(draft)),
        ("redis://redis:6379/0", redis_url), ("verifier:", "127.0.0.1:"), ("drafter:", "127.0.0.1:"),
        ("0.0.0.0", "127.0.0.1"),
    ]

    def local(value) -> str:
        value = str(value)
        for a, b in subst:
            value = value.replace(a, b)
        value = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), value)
        return re.sub(r"\b(50051|50052|50053|9464|8000)\b", lambda m: ports[m.group(1)], value)

    started = []
    try:
        for name in ("verifier", "drafter", "policy", "gateway"):
            spec = services[name]
            env = {k: local(v) for k, v in spec["environment"].items()}
            command = [local(c) for c in spec["command"]]
            assert command[:2] == ["python", "-m"]
            svc = Service(name, [sys.executable, *command[1:]], env,
                          f"127.0.0.1:{env['SPECSERVE_PORT']}" if "SPECSERVE_PORT" in env else "")
            svc.start(tmp_path)
            started.append(svc)
        for svc in started:
            if svc.address:
                wait_healthy(svc.address, 120, svc.proc)
        assert started[2].proc.poll() is None, (tmp_path / "policy.log").read_text()
    finally:
        for svc in reversed(started):
            svc.stop()
