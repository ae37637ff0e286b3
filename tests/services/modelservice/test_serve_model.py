"""serve_model's warm-up and profile cache, with the model, the server and the signals faked: warm
runs at every start, the profile only on a cache miss, and the records reach telemetry either way."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from services.modelservice import servicer as servicer_module
from services.modelservice.compute import ComputeThread
from services.modelservice.config import ModelServiceConfig
from services.modelservice.servicer import ModelServicer, serve_model

NAME = "specserve.v1.Verifier"
RECORDS = [{"call": "profile", "verified_positions": 1, "context_tokens": 65, "forward_ms": 1.5}]


class FakeServer:
    def __init__(self, names):
        self.grpc = None

    def bind(self, address):
        return 50051


async def run_once(server, warm_up, grace_s, on_stop=None):
    """run_until_signalled as if the signal came as soon as the service was ready."""
    await warm_up()
    await on_stop()


class Telemetry:
    def __init__(self):
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def start(self):
        pass

    async def stop(self):
        pass


class Worker:
    sessions = None  # the eviction task sleeps longer than a start lasts here


@pytest.fixture(autouse=True)
def no_model_no_server(monkeypatch):
    import specserve.server

    monkeypatch.setattr(specserve.server, "Server", FakeServer)
    monkeypatch.setattr(specserve.server, "run_until_signalled", run_once)
    monkeypatch.setattr(servicer_module, "load", lambda config: object())


@pytest.fixture
def config(tmp_path) -> ModelServiceConfig:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(28))
    return ModelServiceConfig(model=str(gguf), runtime="llama.cpp", profile_cache=str(tmp_path / "profiles"))


class Calls:
    def __init__(self):
        self.warm, self.profile = [], []

    def warm_up(self, worker):
        self.warm.append(threading.current_thread().name)

    def profiled(self, worker):
        self.profile.append(threading.current_thread().name)
        return [dict(r) for r in RECORDS]


async def start(config: ModelServiceConfig, warm, **kwargs) -> list[dict]:
    servicer = ModelServicer("m", ComputeThread())
    servicer.telemetry = Telemetry()
    await serve_model(config, NAME, servicer, lambda s, g: None, lambda loaded: Worker(), warm, **kwargs)
    assert servicer.worker is not None
    return servicer.telemetry.records


async def test_second_start_warms_but_does_not_profile(config, capsys):
    calls = Calls()
    for _ in range(2):
        assert await start(config, calls.warm_up, profile=calls.profiled, profile_version="1") == RECORDS
    assert len(calls.warm) == 2 and len(calls.profile) == 1
    assert all(name.startswith("model") for name in calls.warm + calls.profile)  # on the compute thread
    out = capsys.readouterr().out
    assert "verifier: profiling the model's step costs" in out and "verifier: using the cached profile from" in out
    assert len(list(Path(config.profile_cache).glob("*.json"))) == 1


async def test_reprofile_profiles_at_every_start(config):
    from dataclasses import replace

    calls = Calls()
    for _ in range(2):
        assert await start(replace(config, reprofile=True), calls.warm_up, profile=calls.profiled,
                           profile_version="1") == RECORDS
    assert len(calls.warm) == 2 and len(calls.profile) == 2
