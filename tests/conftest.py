"""Shared fixtures: the tiny model pair, the real pair when prepared, and one Redis."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The model services started by tests compute in float32, as the in-memory references do: the
# default (bfloat16 where the CPU has it natively) would make exact greedy comparisons depend on
# the machine.
os.environ.setdefault("SPECSERVE_DTYPE", "float32")


@pytest.fixture(scope="session", autouse=True)
def profile_cache(tmp_path_factory):
    """Model services started by tests cache their start-up profiles in this session's folder,
    never the user's: a profile of the real pair measured while tests load the machine would price
    every later start of it."""
    os.environ.setdefault("SPECSERVE_PROFILE_CACHE", str(tmp_path_factory.mktemp("profiles")))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> tuple[Path, Path]:
    """(target, draft) folders of the tiny pair (safetensors, tokenizer and GGUF), saved once."""
    from tests.tiny import save_pair

    return save_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_models(tiny_dir):
    """The tiny pair in memory, on the torch runtime."""
    from tests.helpers import TinyPair
    from tests.tiny import build_pair, build_tokenizer

    tokenizer = build_tokenizer()
    target, draft = build_pair(len(tokenizer))
    return TinyPair("torch", target, draft, tokenizer, tuple(d / "model.gguf" for d in tiny_dir))


@pytest.fixture(scope="session", params=["torch", "llama.cpp"])
def tiny_pair(request, tiny_models):
    """The tiny pair on each runtime in turn: the same weights, served by torch and by llama.cpp."""
    from dataclasses import replace

    return replace(tiny_models, runtime=request.param)


@pytest.fixture(scope="session")
def real_pair() -> tuple[Path, Path]:
    from specserve import pair

    cache = Path(os.environ.get("SPECSERVE_MODEL_CACHE", pair.default_cache_dir()))
    if not (pair.is_prepared(cache, "target") and pair.is_prepared(cache, "draft")):
        pytest.skip("the real model pair is not prepared (specserve models prepare)")
    return pair.prepared_path(cache, "target"), pair.prepared_path(cache, "draft")


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url():
    """REDIS_URL if set; else a testcontainers Redis when a Docker engine answers; else a
    redis-server started on a free port."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    if _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        return
    from specserve.launcher import start_redis

    url, proc = start_redis()
    yield url
    proc.terminate()
    proc.wait()


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()
