"""What can be checked of the deployment files without a Docker engine."""

import json
import re
import shlex
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from specserve.launcher import Service, free_port, wait_healthy

pytestmark = pytest.mark.processes  # starts the services as processes

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "deploy" / "compose.gpu.yml"]


def _schema() -> dict:
    # The compose specification's schema, as vendored (with its licence) by check-jsonschema.
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    return json.loads(text)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path):
    jsonschema.validate(yaml.safe_load(path.read_text()), _schema())


def test_compose_publishes_only_the_gateway():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert [name for name, s in services.items() if s.get("ports")] == ["gateway"]
    for name in ("verifier", "drafter", "gateway"):
        assert services[name]["healthcheck"]["test"][1:3] == ["specserve", "health"]


def test_build_files_reference_existing_paths():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gpu = yaml.safe_load((ROOT / "deploy" / "compose.gpu.yml").read_text())
    dockerfiles = set()
    for doc in (compose, gpu):
        for service in doc["services"].values():
            if "build" in service:
                assert (ROOT / service["build"]["context"]).is_dir()
                dockerfiles.add(ROOT / service["build"]["context"] / service["build"]["dockerfile"])
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("."):
                    assert (ROOT / source).exists(), source
    assert len(dockerfiles) == 2
    for dockerfile in dockerfiles:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY") and "--from" not in line:
                for src in shlex.split(line)[1:-1]:
                    assert (ROOT / src).exists(), f"{dockerfile.name}: {src}"
    for manifest in (ROOT / "deploy" / "k8s" / "kustomization.yaml",):
        for res in yaml.safe_load(manifest.read_text())["resources"]:
            assert (manifest.parent / res).exists()


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
            import sys

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
