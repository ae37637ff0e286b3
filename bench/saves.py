"""Part `saves` of `specserve bench runtime`: what saving a released session's KV to the prefix
cache costs on our llama.cpp runtime, into the ring whose pages are mapped ahead of its head
(specserve/runtime/ring.py) against the same ring left to fault its pages in as a save writes them
(what a save into newly allocated memory pays). Each round prefills sessions, decodes them
interleaved as a batch, then releases them one by one, timing each release; the two rings
alternate, the order flipped every round, and the ratio pairs the sessions of a round."""

from __future__ import annotations

import statistics
import time

from bench.stats import ratio_ci

SESSIONS = 4
VARIANTS = ("mapped ahead", "faulted on write")


def _round(runtime, ring, round_: int, prompt_tokens: int, decode_steps: int) -> list[float]:
    from specserve.runtime import Row

    runtime.saved = ring
    ids = [f"r{round_}-{ring.populating}-{i}" for i in range(SESSIONS)]
    for i, sid in enumerate(ids):  # distinct prompts (ids every vocabulary has): no prefix is shared
        prompt = [(7 * t + 13 * i + 31 * round_) % 250 + 3 for t in range(prompt_tokens)]
        runtime.forward([Row(sid, prompt, [len(prompt) - 1], argmax=True)])
    for step in range(decode_steps):
        runtime.forward([Row(sid, [(step + i) % 250 + 3], [0], argmax=True) for i, sid in enumerate(ids)])
    ms = []
    for sid in ids:
        started = time.perf_counter()
        runtime.release(sid)
        ms.append((time.perf_counter() - started) * 1000)
    for name in list(runtime.prefix.retired):  # no later round reads another ring's entry
        runtime.prefix.drop(name)
    return ms


def run_part(model: str, threads: int, prompt_tokens: int, decode_steps: int, rounds: int,
             cache_mb: int = 1024) -> dict:
    import services  # noqa: F401  (the model services' thread settings)
    from specserve.runtime import open_runtime
    from specserve.runtime.ring import Ring

    runtime = open_runtime(model, "llama.cpp", threads=threads, max_sessions=SESSIONS,
                           kv_tokens=max(1024, SESSIONS * (prompt_tokens + decode_steps + 8)))
    rings = {VARIANTS[0]: Ring(cache_mb << 20), VARIANTS[1]: Ring(cache_mb << 20, populate=False)}
    _round(runtime, rings[VARIANTS[0]], -1, prompt_tokens, decode_steps)  # the first saves map its first pages
    ms: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(rounds):
        for name in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            ms[name] += _round(runtime, rings[name], r, prompt_tokens, decode_steps)
    for ring in rings.values():
        ring.close()
    return {"prompt_tokens": prompt_tokens, "decode_steps": decode_steps, "rounds": rounds, "ms": ms,
            "bytes": max(size for _, size in rings[VARIANTS[0]].entries.values()),
            **{f"{name} p50 ms": statistics.median(v) for name, v in ms.items()},
            # how many times faster a save is into pages mapped ahead
            **ratio_ci(ms[VARIANTS[1]], ms[VARIANTS[0]], stat=statistics.median)}


def markdown(p: dict) -> list[str]:
    ahead, faulted = (p[f"{name} p50 ms"] for name in VARIANTS)
    return ["", "## Prefix cache: saving a released session's KV", "",
            f"{p['rounds']} rounds of {SESSIONS} sessions ({p['prompt_tokens']}-token prompt, {p['decode_steps']} "
            f"decode steps as a batch), each then released; the largest save {p['bytes'] / 1e6:.1f} MB. "
            "Speed = faulted-on-write time per save (p50) / mapped-ahead time.", "",
            "| mapped ahead p50 ms | faulted on write p50 ms | speed (95% CI) | verdict |", "| --- | --- | --- | --- |",
            f"| {ahead:.2f} | {faulted:.2f} | {p['ratio']:.3f} ({p['low']:.3f}-{p['high']:.3f}) | {p['verdict']} |"]
