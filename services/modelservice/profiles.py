"""Start-up profiles cached on disk, so a model service's second start skips the profiling.

A model service profiles its model's step costs at start (tens of seconds), and the policy seeds
its cost model with the records. The records depend only on what was measured and on what it ran
on, so they are stored as JSON, keyed by a hash of everything that changes the costs: the model
files (path, size, mtime), the runtime and its settings, the CPU, the library versions, and a
`profile_version` the caller bumps when what its profile measures changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from services.modelservice.config import ModelServiceConfig
from specserve import __version__, cpu, runtime

log = logging.getLogger(__name__)

ENTRY_FORMAT = 1  # the layout of a cache file; a file of another format is a miss
# Libraries whose kernels set the measured costs (transformers holds the torch runtime's model code).
COST_PACKAGES = ("llama-cpp-python", "torch", "transformers")
WEIGHT_SUFFIXES = (".safetensors", ".bin")

Records = list[dict[str, Any]]


def default_dir() -> Path:
    """~/.cache/specserve/profiles, under $XDG_CACHE_HOME when it is set (beside the model cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "specserve" / "profiles"


def model_files(model: str, runtime_name: str) -> list[Path]:
    """The files the runtime loads for `model`: the GGUF for llama.cpp (and for torch when the
    folder has no torch weights, as the loader then dequantizes it), else the folder's weights and
    config. A hub id is looked up in the local Hugging Face cache, whose snapshot folder names the
    revision; an id not found there has no files and is keyed by its name alone."""
    gguf = runtime.find_gguf(model)
    if gguf is not None and (runtime_name == "llama.cpp" or not runtime.has_torch_weights(model)):
        return [gguf]
    folder = Path(model)
    if not folder.exists():
        folder = _hub_snapshot(model)
        if folder is None:
            return []
    if not folder.is_dir():
        return [folder]
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))


def _hub_snapshot(model_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # an id that is no valid repo name: nothing cached under it
        return None
    return Path(found).parent if isinstance(found, str) else None


def file_identity(path: Path) -> list[Any]:
    """[resolved path, size, mtime_ns]: a replaced or rewritten file changes it (hashing the
    contents of gigabytes at every start would cost more than the profile saved)."""
    st = path.stat()  # follows symlinks, as the Hugging Face cache's blobs are linked
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def key_inputs(config: ModelServiceConfig, service: str, profile_version: str) -> dict[str, Any]:
    """Everything a profile's records depend on, as JSON values (hashed into the cache key and
    stored with the entry). Settings a runtime ignores are left out, so changing them reuses the
    profile; an input that might matter is kept in, as a needless miss costs only one profile."""
    runtime_name = runtime.choose(config.runtime, config.model, config.device)
    inputs: dict[str, Any] = {
        "service": service,
        "profile_version": profile_version,
        "model": config.model if not Path(config.model).exists() else str(Path(config.model).resolve()),
        "model_files": [file_identity(p) for p in model_files(config.model, runtime_name)],
        "runtime": runtime_name,
        "threads": config.threads,
        "max_context": config.max_context,
        # Which proposer the drafter profiles; the verifier ignores it, and it is rarely set there.
        "proposer": config.proposer,
        "cpu_model": cpu.cpuinfo("model name"),
        "cpu_flags": sorted(cpu.flags()),
        "cpus": _cpus(),
        "packages": {name: package_version(name) for name in COST_PACKAGES},
        "specserve": __version__,
    }
    if runtime_name == "llama.cpp":
        # The KV layout sets the cost of a batched decode; llama.cpp always runs on the CPU.
        inputs |= {"max_sessions": config.max_sessions, "kv_tokens": config.kv_tokens,
                   "kv_unified": config.kv_unified}
    else:
        inputs |= {"device": config.device, "dtype": config.dtype, "gpu": _gpu_name(config.device)}
    return inputs


def _cpus() -> int:
    # Cores this process may use: with threads=0 the runtimes use them all.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _gpu_name(device: str) -> str:
    if not device.startswith("cuda"):
        return ""
    try:
        import torch

        return torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else ""
    except Exception:  # no usable CUDA: the load fails on its own; the key need not
        return ""


def profile_key(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


class ProfileCache:
    """Profile records as one JSON file per key under `folder` (default: `default_dir()`)."""

    def __init__(self, folder: str | Path = ""):
        self.folder = Path(folder).expanduser() if str(folder) else default_dir()

    @contextmanager
    def exclusive(self):
        """One profile at a time per cache folder: two model services profiling at once on the
        same cores measured each other (a 1-position verify at 1.6 s instead of 40 ms)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = open(self.folder / ".profiling.lock", "w")  # held across the yield
        except OSError as exc:  # no cache folder to lock in: profile anyway, as with no cache
            log.warning("profiling without the lock: %s", exc)
            yield
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def path(self, inputs: Mapping[str, Any]) -> Path:
        prefix = str(inputs.get("service", "profile")).rsplit(".", 1)[-1].lower() or "profile"
        return self.folder / f"{prefix}-{profile_key(inputs)}.json"

    def load(self, inputs: Mapping[str, Any]) -> Records | None:
        """The cached records, or None when there are none; an unreadable or corrupt entry is
        warned about and treated as missing (profiling again overwrites it)."""
        path = self.path(inputs)
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.warning("ignoring the unreadable cached profile %s: %s", path, exc)
            return None
        records = entry.get("records") if isinstance(entry, dict) else None
        if (not isinstance(entry, dict) or entry.get("format") != ENTRY_FORMAT or not isinstance(records, list)
                or not all(isinstance(r, dict) for r in records)):
            log.warning("ignoring the malformed cached profile %s", path)
            return None
        # The stored inputs guard against a truncated-hash collision and a hand-copied file.
        if entry.get("inputs") != _as_json(inputs):
            log.warning("ignoring the cached profile %s: it was measured for other inputs", path)
            return None
        return records

    def store(self, inputs: Mapping[str, Any], records: Records) -> Path | None:
        """Write the entry atomically (a concurrent reader or a crash never sees half a file);
        a failure (read-only home, full disk) only costs the next start a profile."""
        path = self.path(inputs)
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"format": ENTRY_FORMAT, "inputs": inputs, "records": records}, indent=1)
            with tempfile.NamedTemporaryFile("w", dir=self.folder, prefix=f".{path.name}.", suffix=".tmp",
                                             delete=False) as f:
                tmp = Path(f.name)
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return path
        except (OSError, TypeError, ValueError) as exc:  # TypeError/ValueError: a record JSON cannot hold
            log.warning("could not cache the profile at %s: %s", path, exc)
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            return None


def _as_json(value: Any) -> Any:
    # What `value` reads back as from JSON (tuples become lists), to compare with a stored entry.
    return json.loads(json.dumps(value))


def load_or_profile(cache: ProfileCache, inputs: Mapping[str, Any], profile: Callable[[], Records],
                    reprofile: bool = False, label: str = "model") -> Records:
    """The cached records for `inputs`, or (on a miss, or always with `reprofile`) the records of
    `profile()`, stored for the next start. Prints one progress line either way, as profiling
    takes long enough that an operator should know why the service is not serving yet."""
    path = cache.path(inputs)
    records = None if reprofile else cache.load(inputs)
    if records is not None:
        print(f"{label}: using the cached profile from {path}", flush=True)
        return records
    why = "--reprofile" if reprofile else "first start with this model and settings on this machine"
    print(f"{label}: profiling the model's step costs ({why}; cached for the next)", flush=True)
    with cache.exclusive():
        records = profile()
    cache.store(inputs, records)
    return records


def cached_profile(config: ModelServiceConfig, service: str, profile_version: str, profile: Callable[[], Records],
                   label: str = "model") -> Records:
    """`load_or_profile` for a model service started with `config`: keyed by its model, settings
    and machine, in `config.profile_cache`, profiling again when `config.reprofile` is set."""
    try:
        inputs = key_inputs(config, service, profile_version)
    except OSError as exc:  # a model file gone since the load: profile, but cache nothing
        log.warning("not caching the profile: cannot identify the model files: %s", exc)
        return profile()
    return load_or_profile(ProfileCache(config.profile_cache), inputs, profile, config.reprofile, label)
