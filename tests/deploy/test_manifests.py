"""The deployment files, checked without a Docker engine or a cluster: the compose files against the
compose specification, the Kubernetes manifests against Kubernetes' schemas, and every command and
`SPECSERVE_*` variable they use against the code that reads them."""

import dataclasses
import fnmatch
import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.app import GatewayConfig
from services.modelservice.config import ModelServiceConfig
from services.policy.__main__ import PolicyConfig
from specserve import config as cfg
from specserve import pair
from specserve.cli import build_parser
from specserve.launcher import HUGE_PAGES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "deploy" / "compose.gpu.yml"
K8S = ROOT / "deploy" / "k8s"
README = ROOT / "deploy" / "README.md"
DOCKERFILES = [ROOT / "deploy" / "docker" / "Dockerfile", ROOT / "deploy" / "docker" / "Dockerfile.cuda"]
KUBERNETES_VERSIONS = ("1.29", "1.37")  # the oldest and the newest deploy/README.md names
IMAGE = "specserve"  # the image name the manifests use (kustomize sets its tag)
MODELS_CLAIM = "models"

# The configuration each entry point reads (its `cfg.load(...)`); a command missing here fails.
CONFIGS: dict[str, type] = {
    "services.verifier": ModelServiceConfig,
    "services.drafter": ModelServiceConfig,
    "services.policy": PolicyConfig,
    "gateway": GatewayConfig,
}
# Variables the image's libraries read rather than SpecServe: the cache folder (profiles, Hugging Face).
OTHER_VARIABLES = {"XDG_CACHE_HOME"}
DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")  # compose's ${NAME:-default}


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _compose_services() -> dict[str, dict[str, dict]]:
    """The services as `docker compose up` runs them ("base") and with the GPU override ("gpu"):
    environment maps merge, other keys replace."""
    services = _yaml(COMPOSE)["services"]
    merged = {name: dict(spec) for name, spec in services.items()}
    for name, spec in _yaml(COMPOSE_GPU)["services"].items():
        for key, value in spec.items():
            if key == "environment":
                merged[name][key] = {**merged[name].get(key, {}), **value}
            else:
                merged[name][key] = value
    return {"base": services, "gpu": merged}


def _k8s_docs() -> list[tuple[str, dict]]:
    """(file, document) for every resource the kustomization applies."""
    kustomization = _yaml(K8S / "kustomization.yaml")
    return [(name, doc) for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _pod_templates() -> Iterator[tuple[str, dict]]:
    for _, doc in _k8s_docs():
        if doc["kind"] in ("Deployment", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def _specserve_pods() -> list[tuple[str, dict]]:
    return [(name, pod) for name, pod in _pod_templates() if pod["containers"][0]["image"] == IMAGE]


def _mounts_models(pod: dict) -> bool:
    return any(v.get("persistentVolumeClaim", {}).get("claimName") == MODELS_CLAIM for v in pod.get("volumes", []))


def _k8s_env(container: dict) -> dict[str, str]:
    """The container's environment, with values from the cluster replaced by ones it would give."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "resourceFieldRef" in item["valueFrom"]:
            resource = item["valueFrom"]["resourceFieldRef"]["resource"]
            kind, name = resource.split(".")
            env[item["name"]] = str(container["resources"][kind][name])
        else:
            env[item["name"]] = "a-key-from-the-secret"
    return env


def _compose_env(spec: dict) -> dict[str, str]:
    return {k: DEFAULT.sub(lambda m: m.group(2), str(v)) for k, v in spec.get("environment", {}).items()}


def _commands() -> Iterator[tuple[str, list[str], dict[str, str] | None]]:
    """(where, command, environment) of every container the deployment files start; the images' own
    default command has no environment of its own (the deployment that runs it gives one)."""
    for variant, services in _compose_services().items():
        for name, spec in services.items():
            if "command" in spec and spec.get("image", IMAGE).startswith(IMAGE):
                yield f"compose {variant} {name}", spec["command"], _compose_env(spec)
            test = spec.get("healthcheck", {}).get("test", [])
            if test[1:2] == ["specserve"]:
                yield f"compose {variant} {name} healthcheck", test[1:], {}
    for name, pod in _specserve_pods():
        for container in pod["containers"]:
            yield f"k8s {name}", container["command"], _k8s_env(container)
    for dockerfile in DOCKERFILES:  # the image's own variables: test_dockerfile_variables_are_read_by_the_code
        (cmd,) = re.findall(r"^CMD (.*)$", dockerfile.read_text(), re.M)
        yield dockerfile.name, json.loads(cmd), None


def _variables(cls: type) -> set[str]:
    return {cfg.env_name(f.name) for f in dataclasses.fields(cls)}


# Compose ---------------------------------------------------------------------------------------


def _compose_schema() -> dict:
    # The compose specification's schema, as vendored (with its licence) by check-jsonschema.
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    return json.loads(text)


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path):
    jsonschema.validate(_yaml(path), _compose_schema())


def test_compose_publishes_only_the_gateway():
    services = _yaml(COMPOSE)["services"]
    assert [name for name, s in services.items() if s.get("ports")] == ["gateway"]
    for name in ("verifier", "drafter", "gateway"):
        assert services[name]["healthcheck"]["test"][1:3] == ["specserve", "health"]


def test_long_running_compose_services_restart():
    services = _yaml(COMPOSE)["services"]
    assert services["models"].get("restart", "no") == "no"  # one-shot: the others wait for it to exit 0
    for name, spec in services.items():
        if name != "models":
            assert spec.get("restart") in ("always", "unless-stopped"), name


def test_model_services_share_the_cores():
    """0 threads means every core: two model services on one box would each take them all."""
    services = _compose_services()["base"]
    for name in ("verifier", "drafter"):
        threads = _compose_env(services[name]).get("SPECSERVE_THREADS", "0")
        assert int(threads) > 0, name
    for name, pod in _specserve_pods():
        container = pod["containers"][0]
        if container["command"][2:3] in (["services.verifier"], ["services.drafter"]):
            assert int(_k8s_env(container).get("SPECSERVE_THREADS", "0")) > 0, name


def test_build_files_reference_existing_paths():
    dockerfiles = set()
    for path in (COMPOSE, COMPOSE_GPU):
        for service in _yaml(path)["services"].values():
            if "build" in service:
                assert (ROOT / service["build"]["context"]).is_dir()
                dockerfiles.add(ROOT / service["build"]["context"] / service["build"]["dockerfile"])
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("."):
                    assert (ROOT / source).exists(), source
    assert dockerfiles == set(DOCKERFILES)
    for dockerfile in dockerfiles:
        for src in _copy_sources(dockerfile):
            assert (ROOT / src).exists(), f"{dockerfile.name}: {src}"


def _copy_sources(dockerfile: Path) -> list[str]:
    return [src for line in dockerfile.read_text().splitlines() if line.startswith("COPY") and "--from" not in line
            for src in shlex.split(line)[1:-1]]


# Images ----------------------------------------------------------------------------------------


def _runtime_user(dockerfile: Path) -> tuple[str, int, str]:
    """(user, uid, runtime stage text) of the image's last stage."""
    stage = dockerfile.read_text().rsplit("\nFROM ", 1)[1]
    (user,) = re.findall(r"^USER (\S+)$", stage, re.M)
    (uid,) = re.findall(rf"useradd .*--uid (\d+) {user}\b", stage)
    return user, int(uid), stage


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_owns_its_models_folder(dockerfile):
    """A fresh named volume takes the owner of the folder it is mounted on."""
    user, _, stage = _runtime_user(dockerfile)
    assert re.search(r"\bXDG_CACHE_HOME=/models\b", stage)
    mkdir = re.search(r"mkdir (-p )?/models\b", stage)
    assert mkdir and re.search(rf"chown (-R )?{user}(:{user})? /models\b", stage)
    assert mkdir.start() < stage.index(f"USER {user}")  # as root, before the image switches user


def test_dockerignore_keeps_local_state_out_of_the_build():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for local in (".git", ".venv", "specserve/v1"):
        assert local in patterns
    for dockerfile in DOCKERFILES:
        for src in _copy_sources(dockerfile):
            assert not any(fnmatch.fnmatch(src, p) for p in patterns), f"{dockerfile.name} copies ignored {src}"


# Kubernetes ------------------------------------------------------------------------------------


def test_kustomization_applies_every_manifest():
    listed = set(_yaml(K8S / "kustomization.yaml")["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_follow_the_kubernetes_schemas(version):
    docs = _k8s_docs()
    assert {doc["kind"] for _, doc in docs} >= {"Namespace", "Deployment", "Service", "Job", "PersistentVolumeClaim"}
    errors = []
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors


def test_services_stay_inside_the_cluster():
    services = [doc for _, doc in _k8s_docs() if doc["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} >= {"gateway", "verifier", "drafter", "redis"}
    for service in services:
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]


def test_gateway_takes_its_api_keys_from_a_secret():
    assert "api_keys" in {f.name for f in dataclasses.fields(GatewayConfig)}
    (pod,) = [pod for name, pod in _specserve_pods() if name == "gateway"]
    (keys,) = [e for e in pod["containers"][0]["env"] if e["name"] == cfg.env_name("api_keys")]
    secret = keys["valueFrom"]["secretKeyRef"]
    assert not secret.get("optional", False)  # no Secret, no gateway: never an open one
    assert f"secret generic {secret['name']} --from-literal={secret['key']}=" in README.read_text()


def test_models_claim_is_shared_across_nodes():
    (claim,) = [doc for _, doc in _k8s_docs() if doc["kind"] == "PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == MODELS_CLAIM
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_pods_run_as_the_image_user_and_can_use_the_models_volume():
    uids = {_runtime_user(d)[1] for d in DOCKERFILES}
    assert len(uids) == 1
    (uid,) = uids
    pods = _specserve_pods()
    assert {name for name, _ in pods} == {"models-prepare", "verifier", "drafter", "policy", "gateway"}
    for name, pod in pods:
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True and context.get("runAsUser") == uid, name
        if _mounts_models(pod):
            assert context.get("fsGroup") == uid, name


def _job_cache_dir() -> PurePosixPath:
    (job,) = [pod for name, pod in _pod_templates() if name == "models-prepare"]
    args = build_parser().parse_args(job["containers"][0]["command"][1:])
    return PurePosixPath(args.cache_dir)


def test_deployments_wait_for_their_model(tmp_path):
    """Each pod on the models volume waits in an init container for the marker `models prepare`
    writes last for the model it serves, so it never starts before the Job has finished it."""
    cache = _job_cache_dir()
    folders = {cache / pair.PAIR[role].name for role in ("target", "draft")}
    waiting = [(name, pod) for name, pod in _specserve_pods() if name != "models-prepare" and _mounts_models(pod)]
    assert {name for name, _ in waiting} == {"verifier", "drafter", "gateway"}
    for name, pod in waiting:
        env = _k8s_env(pod["containers"][0])
        model = PurePosixPath(env.get("SPECSERVE_MODEL") or env["SPECSERVE_TOKENIZER"])
        assert model in folders, name
        marker = model / pair._GGUF_MARKER
        (init,) = pod["initContainers"]
        assert init["image"] == IMAGE and str(marker) in " ".join(init["command"]), name
        # The same command on this machine, with the marker in place, finishes.
        local = tmp_path / name / marker.relative_to("/")
        local.parent.mkdir(parents=True)
        local.touch()
        command = [re.sub(r"(?<![\w/])/models/", f"{tmp_path / name}/models/", part) for part in init["command"]]
        assert subprocess.run(command, timeout=10).returncode == 0, name


def test_probes_wait_for_serving_not_for_a_bound_port():
    """gRPC probes ask the standard health service, which answers NOT_SERVING until the model is warm;
    a TCP probe passes as soon as the port is bound."""
    for name, pod in _specserve_pods():
        for container in pod["containers"]:
            probes = {k: v for k, v in container.items() if k.endswith("Probe")}
            assert all("tcpSocket" not in probe for probe in probes.values()), name
            port = _k8s_env(container).get("SPECSERVE_PORT")
            if port is None:
                continue
            assert probes["startupProbe"]["grpc"]["port"] == int(port), name
            assert probes["readinessProbe"]["grpc"]["port"] == int(port), name


# Commands and variables against the code ---------------------------------------------------------


def test_every_command_and_variable_is_one_the_code_reads():
    seen = set()
    for where, command, env in _commands():
        seen.add(command[2] if command[:2] == ["python", "-m"] else " ".join(command[:3]))
        if env is None:
            assert command[:2] == ["python", "-m"] and command[2] in CONFIGS, where
            continue
        others = {k for k in env if not k.startswith("SPECSERVE_")} - OTHER_VARIABLES
        assert not others, f"{where}: {sorted(others)}"
        if command[:2] == ["python", "-m"]:
            cls = CONFIGS[command[2]]
            unknown = set(env) - OTHER_VARIABLES - _variables(cls)
            assert not unknown, f"{where}: {cls.__name__} reads none of {sorted(unknown)}"
            cfg.load(cls, command[3:], env=env)  # every value parses and validates
        else:
            assert command[0] == "specserve", where
            assert "func" in vars(build_parser().parse_args(command[1:])), where
            assert not env, f"{where}: the CLI reads none of {sorted(env)}"
    assert seen >= {*CONFIGS, "specserve models prepare", "specserve health 127.0.0.1:50052"}


def test_dockerfile_variables_are_read_by_the_code():
    every = set().union(*(_variables(cls) for cls in CONFIGS.values()))
    for dockerfile in DOCKERFILES:
        for name in re.findall(r"\b(SPECSERVE_\w+)=", dockerfile.read_text()):
            assert name in every, f"{dockerfile.name}: {name}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_put_the_model_services_on_huge_pages(dockerfile):
    for name, value in HUGE_PAGES.items():
        assert f"{name}={value}" in dockerfile.read_text()


def test_readme_names_what_is_published():
    text = README.read_text()
    gateway = _yaml(COMPOSE)["services"]["gateway"]
    for port in gateway["ports"]:
        assert port.split(":")[-1] in text, port
    for name in set(DEFAULT.findall(COMPOSE.read_text())):
        assert f"`{name[0]}`" in text, name[0]
    assert " and ".join(KUBERNETES_VERSIONS) in text
