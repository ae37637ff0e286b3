"""The benchmark's peer: llama.cpp's own `llama-server`, built by `make peers` from the llama.cpp
source that the pinned llama-cpp-python vendors, run on the same GGUF files and thread count as our
services: plain decoding, its speculative decoding with the draft model (`draft-simple`, default
draft length) and its n-gram speculation (`ngram-simple`); and plain llama-server with the
transparent huge pages our model services ask for (`llama-server-hugepages`), to tell that gain
from the rest."""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from specserve.cpu import cpuinfo
from specserve.launcher import HUGE_PAGES, free_port
from specserve.runtime import find_gguf

PEERS_DIR = Path.home() / ".cache" / "specserve" / "peers"
# peer name -> llama-server's speculation arguments (the draft model is added where needed)
VARIANTS = {
    "llama-server": [],
    "llama-server-draft": ["--spec-type", "draft-simple"],
    # Users tune the draft's minimum probability up from its default of 0 (a loss, they report).
    "llama-server-draft-p75": ["--spec-type", "draft-simple", "--spec-draft-p-min", "0.75"],
    "llama-server-ngram": ["--spec-type", "ngram-simple"],
    "llama-server-ngram-mod": ["--spec-type", "ngram-mod"],
    "llama-server-hugepages": [],
}
VARIANT_ENV = {"llama-server-hugepages": HUGE_PAGES}  # beyond the benchmark's own environment
CONTEXT_PER_SLOT = 1024


def find_llama_server() -> Path | None:
    """The `make peers` build for this CPU (its recorded flags line equals this machine's), if any."""
    flags = cpuinfo("flags")
    for binary in sorted(PEERS_DIR.glob("llama-server-*/llama-server")):
        recorded = binary.parent / "cpu-flags"
        if recorded.exists() and recorded.read_text().split(":", 1)[-1].strip() == flags:
            return binary
    return None


def command(binary: Path, variant: str, target: str, draft: str, slots: int, threads: int, port: int) -> list[str]:
    """The llama-server command line of a peer variant with `slots` parallel sequences."""
    cmd = [str(binary), "-m", str(find_gguf(target)), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "-c", str(CONTEXT_PER_SLOT * slots), "-t", str(threads), "-tb", str(threads),
           "-ngl", "0", "--no-webui", *VARIANTS[variant]]
    if variant.startswith("llama-server-draft"):
        cmd += ["-md", str(find_gguf(draft)), "-td", str(threads), "-ngld", "0"]
    return cmd


@contextmanager
def llama_server(binary: Path, variant: str, target: str, draft: str, slots: int, threads: int, log: Path,
                 timeout_s: float = 300.0):
    """Run one peer until the block ends; yields its base URL once /health answers 200."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(command(binary, variant, target, draft, slots, threads, port), stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **VARIANT_ENV.get(variant, {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{variant} exited with {proc.returncode} during start-up; see {log}")
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"{variant} did not become healthy in {timeout_s:.0f} s; see {log}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
