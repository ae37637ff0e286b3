"""The start-up profile cache: what its key depends on, the round trip, and what it ignores."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from services.modelservice import profiles
from services.modelservice.config import ModelServiceConfig
from services.modelservice.profiles import ProfileCache, cached_profile, key_inputs, load_or_profile, profile_key
from specserve import config as cfg

SERVICE = "specserve.v1.Verifier"
RECORDS = [{"call": "profile", "verified_positions": 3, "context_tokens": 65, "forward_ms": 1.25},
           {"call": "profile", "verified_positions": 8, "context_tokens": 65, "forward_ms": 2.5}]


@pytest.fixture
def gguf(tmp_path) -> Path:
    path = tmp_path / "models" / "draft" / "model.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF" + bytes(60))
    return path


@pytest.fixture
def torch_folder(tmp_path) -> Path:
    folder = tmp_path / "models" / "target"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(bytes(64))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def llama_config(gguf: Path, **changes) -> ModelServiceConfig:
    return dataclasses.replace(ModelServiceConfig(model=str(gguf), runtime="llama.cpp"), **changes)


def torch_config(folder: Path, **changes) -> ModelServiceConfig:
    return dataclasses.replace(ModelServiceConfig(model=str(folder), runtime="torch"), **changes)


def key(config: ModelServiceConfig, service: str = SERVICE, version: str = "1") -> str:
    return profile_key(key_inputs(config, service, version))


def counting(records=RECORDS):
    calls = []

    def profile():
        calls.append(1)
        return [dict(r) for r in records]

    return profile, calls


# --- the key ---------------------------------------------------------------------------------


def test_key_is_stable(gguf, torch_folder):
    assert key(llama_config(gguf)) == key(llama_config(gguf))
    assert key(torch_config(torch_folder)) == key(torch_config(torch_folder))
    assert key_inputs(llama_config(gguf), SERVICE, "1") == json.loads(json.dumps(key_inputs(llama_config(gguf), SERVICE, "1")))


@pytest.mark.parametrize("changes", [{"threads": 4}, {"max_sessions": 8}, {"kv_tokens": 4096}, {"kv_unified": False},
                                     {"proposer": "ngram"}, {"max_context": 512}, {"runtime": "torch"}])
def test_llama_key_changes_with_each_cost_setting(gguf, changes):
    assert key(llama_config(gguf, **changes)) != key(llama_config(gguf))


@pytest.mark.parametrize("changes", [{"threads": 4}, {"device": "cuda:0"}, {"dtype": "bfloat16"}, {"proposer": "ngram"},
                                     {"max_context": 512}])
def test_torch_key_changes_with_each_cost_setting(torch_folder, changes):
    assert key(torch_config(torch_folder, **changes)) != key(torch_config(torch_folder))


@pytest.mark.parametrize("changes", [{"port": 5001}, {"host": "0.0.0.0"}, {"redis_url": "redis://x:6379/0"},
                                     {"step_delay_ms": 5.0}, {"grace_s": 1.0}, {"instance": "v2"}, {"session_ttl_s": 5.0},
                                     {"reprofile": True}, {"profile_cache": "/elsewhere"},
                                     # settings the llama.cpp runtime ignores (it always runs on the CPU)
                                     {"device": "cuda:1"}, {"dtype": "float16"}])
def test_llama_key_ignores_settings_that_do_not_change_costs(gguf, changes):
    assert key(llama_config(gguf, **changes)) == key(llama_config(gguf))


@pytest.mark.parametrize("changes", [{"max_sessions": 8}, {"kv_tokens": 4096}, {"kv_unified": False}])
def test_torch_key_ignores_the_llama_kv_settings(torch_folder, changes):
    assert key(torch_config(torch_folder, **changes)) == key(torch_config(torch_folder))


def test_key_changes_with_the_service_and_the_profile_version(gguf):
    config = llama_config(gguf)
    assert key(config, "specserve.v1.Drafter") != key(config)
    assert key(config, version="2") != key(config)


def test_key_changes_when_the_model_file_changes(gguf):
    config = llama_config(gguf)
    before = key(config)
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = key(config)
    assert touched != before
    gguf.write_bytes(b"GGUF" + bytes(100))  # another size
    assert key(config) not in (before, touched)


def test_key_changes_with_the_model_path(gguf):
    copy = gguf.parent.parent / "other" / "model.gguf"
    copy.parent.mkdir()
    shutil.copy2(gguf, copy)  # same size and mtime, another file
    assert key(llama_config(copy)) != key(llama_config(gguf))
    # The folder and the GGUF in it are the same model on llama.cpp.
    assert key_inputs(llama_config(gguf.parent), SERVICE, "1")["model_files"] == \
        key_inputs(llama_config(gguf), SERVICE, "1")["model_files"]


def test_torch_key_follows_the_weights_and_config_not_other_files(torch_folder):
    config = torch_config(torch_folder)
    before = key(config)
    (torch_folder / "tokenizer.json").write_text('{"changed": true}')
    (torch_folder / "README.md").write_text("notes")
    assert key(config) == before
    (torch_folder / "model.safetensors").write_bytes(bytes(128))
    after_weights = key(config)
    assert after_weights != before
    (torch_folder / "config.json").write_text('{"num_hidden_layers": 2}')
    assert key(config) != after_weights


def test_torch_over_a_gguf_only_folder_keys_the_gguf(gguf):
    files = key_inputs(torch_config(gguf.parent), SERVICE, "1")["model_files"]
    assert [f[0] for f in files] == [str(gguf.resolve())]


def test_hub_id_keys_the_cached_snapshot(monkeypatch, torch_folder):
    monkeypatch.setattr(profiles, "_hub_snapshot", lambda model_id: None)
    bare = key_inputs(torch_config(torch_folder, model="org/model"), SERVICE, "1")
    assert bare["model"] == "org/model" and bare["model_files"] == []
    assert key(torch_config(torch_folder, model="org/other")) != profile_key(bare)
    monkeypatch.setattr(profiles, "_hub_snapshot", lambda model_id: torch_folder)
    snap = key_inputs(torch_config(torch_folder, model="org/model"), SERVICE, "1")
    assert sorted(Path(f[0]).name for f in snap["model_files"]) == ["config.json", "model.safetensors"]


def test_key_changes_with_the_cpu(monkeypatch, gguf):
    from specserve import cpu

    config = llama_config(gguf)
    before = key(config)
    monkeypatch.setattr(cpu, "flags", lambda: {"sse2", "avx2", "imaginary_flag"})
    with_flags = key(config)
    assert with_flags != before
    monkeypatch.setattr(cpu, "cpuinfo", lambda field: "Some Other CPU" if field == "model name" else "")
    assert key(config) != with_flags


@pytest.mark.parametrize("package", profiles.COST_PACKAGES)
def test_key_changes_with_each_library_version(monkeypatch, gguf, package):
    config = llama_config(gguf)
    before = key(config)
    real = profiles.package_version
    monkeypatch.setattr(profiles, "package_version", lambda name: "99.0" if name == package else real(name))
    assert key(config) != before


def test_key_changes_with_the_specserve_version(monkeypatch, gguf):
    before = key(llama_config(gguf))
    monkeypatch.setattr(profiles, "__version__", "99.0.0")
    assert key(llama_config(gguf)) != before


def test_missing_package_has_an_empty_version():
    assert profiles.package_version("no-such-package-specserve-test") == ""


# --- the cache -------------------------------------------------------------------------------


def test_round_trip(tmp_path, gguf):
    cache = ProfileCache(tmp_path / "profiles")
    inputs = key_inputs(llama_config(gguf), SERVICE, "1")
    assert cache.load(inputs) is None
    path = cache.store(inputs, RECORDS)
    assert path == cache.path(inputs) and path.parent == tmp_path / "profiles" and path.name.startswith("verifier-")
    assert cache.load(inputs) == RECORDS
    assert [p.name for p in (tmp_path / "profiles").iterdir()] == [path.name]  # no temp file left behind
    other = key_inputs(llama_config(gguf, threads=2), SERVICE, "1")
    assert cache.load(other) is None


def test_store_replaces_an_entry(tmp_path, gguf):
    cache = ProfileCache(tmp_path / "profiles")
    inputs = key_inputs(llama_config(gguf), SERVICE, "1")
    cache.store(inputs, RECORDS)
    cache.store(inputs, RECORDS[:1])
    assert cache.load(inputs) == RECORDS[:1]


def test_default_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ProfileCache().folder == tmp_path / "specserve" / "profiles"
    assert ProfileCache("").folder == tmp_path / "specserve" / "profiles"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ProfileCache().folder == Path.home() / ".cache" / "specserve" / "profiles"
    assert ProfileCache("~/p").folder == Path.home() / "p"


CORRUPT = [
    b"{not json",
    b"\xff\xfe\x00garbage",
    b"",
    b"[1, 2]",
    b'{"format": 1, "inputs": {}}',
    b'{"format": 1, "records": {"a": 1}}',
    b'{"format": 1, "records": [1, 2]}',
    b'{"format": 999, "records": []}',
]


@pytest.mark.parametrize("content", CORRUPT)
def test_a_corrupt_entry_is_ignored_with_a_warning_and_reprofiled(tmp_path, gguf, caplog, content):
    cache = ProfileCache(tmp_path / "profiles")
    inputs = key_inputs(llama_config(gguf), SERVICE, "1")
    cache.folder.mkdir()
    cache.path(inputs).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger=profiles.__name__):
        assert cache.load(inputs) is None
    assert "cached profile" in caplog.text
    profile, calls = counting()
    assert load_or_profile(cache, inputs, profile) == RECORDS
    assert calls == [1]
    assert cache.load(inputs) == RECORDS  # the corrupt entry was overwritten


def test_an_entry_for_other_inputs_is_ignored(tmp_path, gguf, caplog):
    cache = ProfileCache(tmp_path / "profiles")
    inputs = key_inputs(llama_config(gguf), SERVICE, "1")
    other = cache.store(key_inputs(llama_config(gguf, threads=3), SERVICE, "1"), RECORDS)
    other.rename(cache.path(inputs))  # as if the hashes had collided
    with caplog.at_level(logging.WARNING, logger=profiles.__name__):
        assert cache.load(inputs) is None
    assert "other inputs" in caplog.text


def test_an_unreadable_entry_is_ignored(tmp_path, gguf, caplog):
    cache = ProfileCache(tmp_path / "profiles")
    inputs = key_inputs(llama_config(gguf), SERVICE, "1")
    cache.path(inputs).mkdir(parents=True)  # reading it fails with an OSError
    with caplog.at_level(logging.WARNING, logger=profiles.__name__):
        assert cache.load(inputs) is None
    assert "unreadable" in caplog.text


def test_a_failed_store_is_a_warning_not_an_error(tmp_path, gguf, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = ProfileCache(blocker / "profiles")  # its parent is a file: mkdir fails
    inputs = key_inputs(llama_config(gguf), SERVICE, "1")
    profile, calls = counting()
    with caplog.at_level(logging.WARNING, logger=profiles.__name__):
        assert load_or_profile(cache, inputs, profile) == RECORDS
    assert "could not cache" in caplog.text
    cache = ProfileCache(tmp_path / "ok")
    assert cache.store(inputs, [{"x": object()}]) is None  # no JSON value
    cache.path(inputs).mkdir()  # os.replace onto a folder fails after the temp file is written
    assert cache.store(inputs, RECORDS) is None
    assert [p.name for p in cache.folder.iterdir()] == [cache.path(inputs).name]  # the temp file was removed


# --- load or profile -------------------------------------------------------------------------


def test_profiles_once_then_hits(tmp_path, gguf, capsys):
    cache = ProfileCache(tmp_path / "profiles")
    inputs = key_inputs(llama_config(gguf), SERVICE, "1")
    profile, calls = counting()
    assert load_or_profile(cache, inputs, profile, label="verifier") == RECORDS
    assert "verifier: profiling the model's step costs" in capsys.readouterr().out
    assert load_or_profile(cache, inputs, profile, label="verifier") == RECORDS
    assert calls == [1]
    assert f"verifier: using the cached profile from {cache.path(inputs)}" in capsys.readouterr().out


def test_reprofile_forces_a_miss_and_refreshes_the_entry(tmp_path, gguf, capsys):
    cache = ProfileCache(tmp_path / "profiles")
    inputs = key_inputs(llama_config(gguf), SERVICE, "1")
    cache.store(inputs, RECORDS[:1])
    profile, calls = counting()
    assert load_or_profile(cache, inputs, profile, reprofile=True) == RECORDS
    assert calls == [1]
    assert "--reprofile" in capsys.readouterr().out
    assert cache.load(inputs) == RECORDS


def test_cached_profile_follows_the_config(tmp_path, gguf):
    config = llama_config(gguf, profile_cache=str(tmp_path / "cache"))
    profile, calls = counting()
    for _ in range(2):
        assert cached_profile(config, SERVICE, "1", profile) == RECORDS
    assert calls == [1]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert cached_profile(dataclasses.replace(config, reprofile=True), SERVICE, "1", profile) == RECORDS
    assert calls == [1, 1]
    assert cached_profile(config, SERVICE, "2", profile) == RECORDS  # a new profile version misses
    assert calls == [1, 1, 1]


def test_cached_profile_without_model_files_profiles_and_caches_nothing(tmp_path, gguf, monkeypatch):
    config = llama_config(gguf, profile_cache=str(tmp_path / "cache"))

    def vanished(config, service, version):
        raise FileNotFoundError(gguf)

    monkeypatch.setattr(profiles, "key_inputs", vanished)
    profile, calls = counting()
    assert cached_profile(config, SERVICE, "1", profile) == RECORDS
    assert calls == [1] and not (tmp_path / "cache").exists()


# --- the settings ----------------------------------------------------------------------------


def test_settings_from_flags_and_environment(tmp_path):
    config = cfg.load(ModelServiceConfig, ["--model", "m", "--reprofile", "true", "--profile-cache", str(tmp_path)], env={})
    assert config.reprofile is True and config.profile_cache == str(tmp_path)
    config = cfg.load(ModelServiceConfig, ["--model", "m"], env={"SPECSERVE_REPROFILE": "1",
                                                                 "SPECSERVE_PROFILE_CACHE": "/p"})
    assert config.reprofile is True and config.profile_cache == "/p"
    config = cfg.load(ModelServiceConfig, ["--model", "m"], env={})
    assert config.reprofile is False and config.profile_cache == ""


def test_two_services_never_profile_at_once(tmp_path):
    """The second profile waits for the first: they would measure each other on shared cores."""
    import threading

    from services.modelservice.profiles import ProfileCache

    cache, inside, overlaps = ProfileCache(tmp_path), [], []

    def profile(name: str) -> None:
        with cache.exclusive():
            inside.append(name)
            overlaps.append(len(inside))
            started.set()
            release.wait(5)
            inside.remove(name)

    started, release = threading.Event(), threading.Event()
    first = threading.Thread(target=profile, args=("verifier",))
    first.start()
    assert started.wait(5)
    started.clear()
    second = threading.Thread(target=profile, args=("drafter",))
    second.start()
    assert not started.wait(0.2)  # blocked behind the first (a bounded wait for the fault's absence)
    release.set()
    first.join(5)
    second.join(5)
    assert overlaps == [1, 1]
