"""Part `pages` of `specserve bench runtime`: plain decoding on our llama.cpp runtime with the model
services' transparent huge pages (specserve/launcher.py, HUGE_PAGES) against 4 KB pages. Each
sample is a fresh process (where a process's memory lands is the very thing measured), the two
alternated and the order flipped every round; the ratio pairs the samples of a round.

`python -m bench.pages MODEL THREADS TOKENS` is one sample: it prints the mean milliseconds per
decoded token of one session after a 160-token prompt, and the GLIBC_TUNABLES it ran under."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from bench.stats import ratio_ci
from specserve.launcher import HUGE_PAGES

PROMPT_TOKENS = 160
VARIANTS = {"huge pages": HUGE_PAGES, "4 KB pages": {}}


def sample(model: str, threads: int, tokens: int) -> float:
    """Mean ms per decoded token of one greedy session, in this process."""
    import services  # noqa: F401  (the model services' thread settings)
    from specserve.runtime import Row, open_runtime

    runtime = open_runtime(model, "llama.cpp", threads=threads, max_sessions=1,
                           kv_tokens=max(1024, PROMPT_TOKENS + tokens))
    prompt = [(7 * i) % 250 + 3 for i in range(PROMPT_TOKENS)]  # ids every vocabulary has, the tiny one too
    token = int(runtime.forward([Row("s", prompt, [len(prompt) - 1], argmax=True)])[0][0])
    started = time.perf_counter()
    for _ in range(tokens):
        token = int(runtime.forward([Row("s", [token], [0], argmax=True)])[0][0])
    return (time.perf_counter() - started) * 1000 / tokens


def run_part(model: str, threads: int, tokens: int, rounds: int) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    ms: dict[str, list[float]] = {name: [] for name in VARIANTS}
    tunables: dict[str, str] = {}
    for r in range(rounds):
        for name in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
            out = subprocess.run([sys.executable, "-m", "bench.pages", model, str(threads), str(tokens)],
                                 env={**clean, **VARIANTS[name]}, capture_output=True, text=True, check=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            ms[name].append(got["ms"])
            tunables[name] = got["tunables"]
    # tokens/s of huge pages over 4 KB pages = 4 KB's time per token over huge pages'
    speed = ratio_ci(ms["4 KB pages"], ms["huge pages"])
    return {"tokens": tokens, "rounds": rounds, "ms_per_token": ms, "tunables": tunables,
            "huge_pages_ms": statistics.mean(ms["huge pages"]), "small_pages_ms": statistics.mean(ms["4 KB pages"]),
            **speed}


def markdown(p: dict) -> list[str]:
    return ["", "## Huge pages: our llama.cpp decode, a fresh process per sample", "",
            f"{p['rounds']} rounds of {p['tokens']} tokens after a {PROMPT_TOKENS}-token prompt, one session, "
            "alternated. Speed = 4 KB pages' time per token / huge pages'.", "",
            "| huge pages ms/token | 4 KB pages ms/token | speed (95% CI) | verdict |", "| --- | --- | --- | --- |",
            f"| {p['huge_pages_ms']:.2f} | {p['small_pages_ms']:.2f} | {p['ratio']:.3f} ({p['low']:.3f}-{p['high']:.3f}) "
            f"| {p['verdict']} |"]


if __name__ == "__main__":
    print(json.dumps({"ms": sample(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])),
                      "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
