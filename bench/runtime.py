"""`specserve bench runtime`: what the model runtimes cost, and what the whole stack makes of them.

1. Cost table: one forward of 1, 2, 4 and 8 positions per session over 1, 4 and 8 sessions at
   context 200 and 2,000, on each runtime (the same measurement the model services make at start-up
   to seed the policy's cost model, over more shapes); and, on the torch runtime, the share of a
   verify step spent outside the model forward at batch 8 and context 2,000.
2. Plain decoding through the whole stack (`off`, verifier on llama.cpp) against a bare
   llama-cpp-python decode loop on the same GGUF file and thread count, at 1 and 4 concurrent
   requests, interleaved.
3. Policies through the stack on HumanEval and MT-Bench prompts at 1 and 4 concurrent requests:
   time per output token and time to first token of each policy against `off` on the same prompts,
   each policy and `off` alternated, ratios with bootstrap 95% intervals. Every request reads its
   prompt in full, and no drafting policy meets a prompt another run has answered.
4. The HTTP front against gRPC: the same streamed requests (plain decoding) over each, alternated,
   time per output token measured by the client.
5. `serve`: the whole stack against llama.cpp's `llama-server` on eight chat requests of our own,
   closed loop at 1 and 4 clients, rounds alternated (bench/serve.py).
6. `pages`: our llama.cpp decode with the model services' transparent huge pages against 4 KB
   pages, a fresh process per sample, alternated (bench/pages.py).
7. `saves`: what saving a released session's KV to the prefix cache costs, into the ring mapped
   ahead of its head against the same ring faulting its pages in on write (bench/saves.py).

Writes bench/results/runtime.json and runtime.md, with the CPU flags of the machine.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import redis
from tqdm import tqdm

from bench import pages, saves, serve
from bench import prompts as prompt_sets
from bench.replay import fit_prompt
from bench.stats import ratio_ci
from bench.system import machine_facts, served_model, set_policy
from specserve.launcher import Stack
from specserve.ops import OPS_PREFIX
from specserve.runtime import Row, open_runtime
from specserve.v1 import gateway_pb2, gateway_pb2_grpc

PARTS = ("costs", "decode", "policies", "http", "bursts", "serve", "pages", "saves")


@dataclass
class RuntimeBenchConfig:
    target: str
    draft: str
    redis_url: str
    out: Path
    runtimes: tuple[str, ...] = ("llama.cpp", "torch")
    threads: int = 2
    positions: tuple[int, ...] = (1, 2, 4, 8)
    sessions: tuple[int, ...] = (1, 4, 8)
    contexts: tuple[int, ...] = (200, 2000)
    repeats: int = 3
    decode_tokens: int = 48
    decode_rounds: int = 3
    prompts_per_set: int = 6
    new_tokens: int = 48
    policies: tuple[str, ...] = ("off", "adaptive", "static:1", "static:2", "static:3")
    concurrency: tuple[int, ...] = (1, 4)
    settle_s: float = 1.5
    parts: tuple[str, ...] = PARTS
    http_rounds: int = 4
    burst_steps: tuple[int, int] = (4, 16)  # bursts: the ops key max_plain_steps, shorter then longer
    bursts_rounds: int = 4  # bursts: rounds of the serving prompts per value, alternated
    serve_rounds: int = 3  # serve: rounds of the eight prompts per client, systems alternated
    serve_max_tokens: int = 96
    serve_policies: tuple[str, ...] = ("off", "adaptive")  # our policies against llama-server
    serve_peers: tuple[str, ...] = ("llama-server",)  # llama-server variants (bench/peers.py VARIANTS)
    serve_workload: str = "all"  # all, fresh or edits
    serve_proposer: str = ""  # our drafter's proposer (SPECSERVE_PROPOSER); empty: the default
    serve_conversations: int = 8  # MT-Bench conversations of two turns (prefix reuse); 0 skips
    serve_peers_first: bool = False  # start llama-server before our stack (start order weighs on decode)
    pages_rounds: int = 4  # pages: fresh-process samples per page size, alternated
    pages_tokens: int = 64
    saves_rounds: int = 4  # saves: rounds of released sessions per ring, alternated
    saves_prompt_tokens: int = 300
    saves_decode_steps: int = 48


def _tokens(n: int, salt: int = 0) -> list[int]:
    return [(7 * i + 13 * salt) % 5000 + 100 for i in range(n)]  # ids every real vocabulary has


def cost_table(cfg: RuntimeBenchConfig) -> list[dict]:
    """Per runtime and context, the largest batch of sessions is prefilled once (in chunks, through
    the target worker, as the verifier does); each measured forward rolls back afterwards."""
    from services.verifier.worker import VerifierWorker
    from specserve.contracts import PrefillItem, SamplingParams

    rows = []
    for name in cfg.runtimes:
        runtime = open_runtime(cfg.target, name, threads=cfg.threads, max_sessions=max(cfg.sessions),
                               kv_tokens=max(cfg.sessions) * (max(cfg.contexts) + 64), max_context=max(cfg.contexts) + 64)
        worker = VerifierWorker(runtime)
        for ctx in cfg.contexts:
            ids = [f"c{i}" for i in range(max(cfg.sessions))]
            for i, sid in enumerate(tqdm(ids, desc=f"prefill {name} x{ctx}")):
                prompt = _tokens(ctx, i)
                for start in range(0, ctx, 512):
                    worker.prefill([PrefillItem(sid, prompt[start : start + 512], SamplingParams(),
                                                partial=start + 512 < ctx, append=start > 0)])
            for n in cfg.sessions:
                for p in cfg.positions:
                    samples = []
                    for _ in range(cfg.repeats):
                        started = time.perf_counter()
                        runtime.forward([Row(sid, [5] * p, list(range(p))) for sid in ids[:n]])
                        samples.append((time.perf_counter() - started) * 1000)
                        for sid in ids[:n]:
                            runtime.truncate(sid, ctx)
                    rows.append({"runtime": name, "context": ctx, "sessions": n, "positions": p,
                                 "ms": statistics.median(samples)})
            if name == "torch" and ctx == max(cfg.contexts):
                rows.append({"runtime": name, **torch_step_overhead(worker, ids, cfg.repeats)})
            worker.release(ids)
        del worker, runtime
    return rows


def torch_step_overhead(worker, ids: list[str], repeats: int, drafts: int = 3) -> dict:
    """A verify step (VerifierWorker.verify: rows, forward, acceptance, rollback) over the prefilled
    sessions: the share of its time spent outside the model forward."""
    from specserve.contracts import VerifyItem

    runtime = worker.runtime
    shares = []
    for _ in range(repeats):
        runtime.forward_ns = 0
        started = time.perf_counter_ns()
        worker.verify([VerifyItem(sid, len(worker.sessions.get(sid).tokens), [5] * drafts) for sid in ids])
        step = time.perf_counter_ns() - started
        shares.append((step - runtime.forward_ns) / step)
    context = runtime.length(ids[0])
    return {"overhead_batch": len(ids), "overhead_context": context, "outside_forward_share": statistics.median(shares)}


def bare_decode(gguf: Path, threads: int, prompts: list[list[int]], tokens: int) -> float:
    """Tokens per second per request of a bare llama-cpp-python greedy loop: prefill each prompt,
    then one `llama_decode` per step over all sequences."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_seq_max = 4096, 512, len(prompts)
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(items: list[tuple[int, list[int], int]]) -> list[int]:  # (seq, tokens, first pos) -> argmax per seq
        n = 0
        last = []
        for seq, toks, pos in items:
            for i, t in enumerate(toks):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = t, pos + i, 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = i == len(toks) - 1
                n += 1
            last.append(n - 1)
        batch.n_tokens = n
        assert llama_cpp.llama_decode(ctx, batch) == 0
        return [int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(vocab,)).argmax())
                for i in last]

    nxt = [decode([(s, p, 0)])[0] for s, p in enumerate(prompts)]
    pos = [len(p) for p in prompts]
    started = time.perf_counter()
    for _ in range(tokens):
        nxt = decode([(s, [t], pos[s]) for s, t in enumerate(nxt)])
        pos = [p + 1 for p in pos]
    elapsed = time.perf_counter() - started
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return tokens / elapsed


async def _generate(stub, ids: list[int], tokens: int) -> gateway_pb2.GenerationStats:
    last = None
    request = gateway_pb2.GenerateRequest(prompt_token_ids={"ids": ids}, sampling={"max_new_tokens": tokens})
    async for message in stub.Generate(request, timeout=600):
        last = message
    return last.stats


async def _client_tpot_grpc(stub, ids: list[int], tokens: int) -> float:
    """Time per output token as the client sees it: first to last streamed token."""
    stamps, count = [], 0
    request = gateway_pb2.GenerateRequest(prompt_token_ids={"ids": ids}, sampling={"max_new_tokens": tokens})
    async for message in stub.Generate(request, timeout=600):
        if message.token_ids:
            stamps.append(time.perf_counter())
            count += len(message.token_ids)
    return (stamps[-1] - stamps[0]) * 1000 / max(count - 1, 1)


async def _client_tpot_http(http, url: str, model: str, ids: list[int], tokens: int) -> float:
    body = {"model": model, "prompt": ids, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    stamps, count = [], 0
    async with http.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            doc = json.loads(line[6:])
            if doc.get("usage"):
                count = doc["usage"]["completion_tokens"]
            elif doc["choices"]:  # a chunk of tokens (its text may be held back at a partial character)
                stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) * 1000 / max(count - 1, 1)


async def _http_vs_grpc(stack: Stack, prompts: list[list[int]], tokens: int, http_first: bool) -> dict[str, list[float]]:
    import httpx

    model = Path(stack.target_model).name
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel, httpx.AsyncClient(timeout=600) as http:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        out = {}
        for front in (("http", "grpc") if http_first else ("grpc", "http")):
            calls = [_client_tpot_http(http, f"{stack.http_address}/v1/completions", model, p, tokens) if front == "http"
                     else _client_tpot_grpc(stub, p, tokens) for p in prompts]
            out[front] = list(await asyncio.gather(*calls))
        return out


async def _round(address: str, prompts: list[list[int]], tokens: int) -> list[gateway_pb2.GenerationStats]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        return list(await asyncio.gather(*(_generate(stub, p, tokens) for p in prompts)))


@dataclass
class Sample:
    part: str
    policy: str
    prompt_set: str
    concurrency: int
    prompt: int
    tpot_ms: float
    drafted: int = 0
    accepted: int = 0
    ttft_ms: float = 0.0
    cached_share: float = 0.0  # of the prompt's tokens, those the prefix cache held


def _headed(tokenizer, texts: list[str], run: int, chat: bool) -> list[list[int]]:
    """The prompts as one run sends them: a first line naming the run (a code comment, or the chat's
    system message), so two runs' prompts share no prefix beyond that line's first tokens."""
    if not chat:
        return [fit_prompt(tokenizer.encode(f"# run {run}\n{t}"), 96) for t in texts]
    system = f"You are a helpful assistant. Run {run}."
    ids = [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": t}],
                                         add_generation_prompt=True) for t in texts]
    return [list(c["input_ids"] if isinstance(c, dict) or hasattr(c, "keys") else c) for c in ids]


def _policies(cfg: RuntimeBenchConfig, client: redis.Redis, stack: Stack, tokenizer) -> list[Sample]:
    """Each drafting policy at each concurrency gets prompts of its own, which `off` answers too,
    the two alternating group by group. No drafting run sees a prompt another has answered (the
    drafter's index of earlier outputs would copy that answer), and each run's first line keeps the
    other's KV from serving its prompt: every request reads its prompt in full."""
    drafting = [p for p in cfg.policies if p != "off"]
    sets = {"humaneval": (prompt_sets.humaneval(), False), "mt-bench": (prompt_sets.mt_bench(), True)}
    need = len(cfg.concurrency) * len(drafting) * cfg.prompts_per_set
    if any(len(texts) < need for texts, _ in sets.values()):
        raise ValueError(f"part policies needs {need} prompts per set; have "
                         + ", ".join(f"{len(t)} in {name}" for name, (t, _) in sets.items()))
    samples = []
    with tqdm(total=len(sets) * 2 * need, desc="policies") as bar:
        for set_name, (texts, chat) in sets.items():
            for c, n in enumerate(cfg.concurrency):
                for j, policy in enumerate(drafting):
                    first = (c * len(drafting) + j) * cfg.prompts_per_set
                    own = texts[first : first + cfg.prompts_per_set]
                    runs = {"off": _headed(tokenizer, own, 0, chat), policy: _headed(tokenizer, own, 1, chat)}
                    for g in range(0, len(own), n):
                        for p in ("off", policy) if (g // n) % 2 == 0 else (policy, "off"):
                            set_policy(client, p)
                            time.sleep(cfg.settle_s)
                            group = runs[p][g : g + n]
                            for i, s in enumerate(asyncio.run(_round(stack.gateway_address, group, cfg.new_tokens))):
                                samples.append(Sample("policy", p, set_name, n, first + g + i, s.tpot_ms,
                                                      s.draft_tokens, s.accepted_tokens, s.ttft_ms,
                                                      s.cached_tokens / max(s.prompt_tokens, 1)))
                            bar.update(len(group))
    return samples


def stack_parts(cfg: RuntimeBenchConfig, tokenizer, results: dict) -> None:
    from specserve.runtime import find_gguf

    client = redis.Redis.from_url(cfg.redis_url)
    env = {"SPECSERVE_RUNTIME": "llama.cpp", "SPECSERVE_THREADS": str(cfg.threads)}
    stack = Stack(cfg.target, cfg.draft, cfg.redis_url, extra_env=env).start()
    samples: list[Sample] = []
    code = [fit_prompt(tokenizer.encode(t), 96) for t in prompt_sets.humaneval()[: cfg.prompts_per_set]]
    try:
        if "decode" in cfg.parts:
            gguf = find_gguf(cfg.target)
            for n in cfg.concurrency:
                for r in range(cfg.decode_rounds):
                    prompts = code[:n]
                    set_policy(client, "off")
                    time.sleep(cfg.settle_s)
                    stats = asyncio.run(_round(stack.gateway_address, prompts, cfg.decode_tokens))
                    stack_rate = statistics.mean(1000 / s.tpot_ms for s in stats)
                    bare_rate = bare_decode(gguf, cfg.threads, prompts, cfg.decode_tokens)
                    samples.append(Sample("decode-stack", "off", "code", n, r, 1000 / stack_rate))
                    samples.append(Sample("decode-bare", "bare", "code", n, r, 1000 / bare_rate))
        if "policies" in cfg.parts:
            samples += _policies(cfg, client, stack, tokenizer)
        if "http" in cfg.parts:
            set_policy(client, "off")
            time.sleep(cfg.settle_s)
            for n in cfg.concurrency:
                for r in range(cfg.http_rounds):
                    tpots = asyncio.run(_http_vs_grpc(stack, code[:n], cfg.decode_tokens, http_first=r % 2 == 1))
                    for front, values in tpots.items():
                        samples.extend(Sample(f"front-{front}", "off", "code", n, r * n + i, v) for i, v in enumerate(values))
        if "bursts" in cfg.parts:
            samples += _bursts(cfg, client, stack)
    finally:
        stack.stop()
    results["samples"] = [s.__dict__ for s in samples]
    results["http"] = _http_summary(samples, cfg)
    results["decode"] = _decode_summary(samples, cfg)
    results["policies"] = _policy_summary(samples, cfg)
    results["bursts"] = _bursts_summary(samples, cfg)


def _bursts(cfg: RuntimeBenchConfig, client: redis.Redis, stack: Stack) -> list[Sample]:
    """Plain decoding with decode bursts of two lengths (the ops key `max_plain_steps`) alternated
    by round on the one running system: the serving part's prompts over the HTTP API, each client
    in a closed loop, the time per output token as the client sees it."""
    samples, model, prompts = [], served_model(stack.http_address), serve.workload(cfg.serve_workload)
    set_policy(client, "off")
    try:
        for n in cfg.concurrency:
            for r in range(cfg.bursts_rounds):
                for steps in cfg.burst_steps if r % 2 == 0 else cfg.burst_steps[::-1]:
                    client.set(OPS_PREFIX + "max_plain_steps", str(steps))
                    time.sleep(cfg.settle_s)  # the gateway reads the ops keys every second
                    replies, _ = asyncio.run(serve.closed_loop(stack.http_address, model, prompts, n,
                                                               cfg.serve_max_tokens, f"bursts-{steps}", r))
                    samples += [Sample(f"bursts-{steps}", "off", cfg.serve_workload, n, r * len(replies) + i,
                                       x.tpot_ms) for i, x in enumerate(replies) if x.tpot_ms and not x.error]
    finally:
        client.delete(OPS_PREFIX + "max_plain_steps")
    return samples


def _pairs(samples: list[Sample], cfg: RuntimeBenchConfig, part_a: str, part_b: str):
    """Per concurrency that has samples: the times per token of two parts measured side by side."""
    for n in cfg.concurrency:
        a = [s.tpot_ms for s in samples if s.part == part_a and s.concurrency == n]
        b = [s.tpot_ms for s in samples if s.part == part_b and s.concurrency == n]
        if a:
            yield n, a, b


def _decode_summary(samples: list[Sample], cfg: RuntimeBenchConfig) -> list[dict]:
    # Throughput ratio = bare time per token / stack time per token.
    return [{"concurrency": n, "stack_tokens_per_s": 1000 / statistics.mean(stack),
             "bare_tokens_per_s": 1000 / statistics.mean(bare), **ratio_ci(bare, stack)}
            for n, stack, bare in _pairs(samples, cfg, "decode-stack", "decode-bare")]


def _bursts_summary(samples: list[Sample], cfg: RuntimeBenchConfig) -> list[dict]:
    # Longer bursts' time per token / shorter ones' (0.94 is 6% less), per request both answered.
    short, long = cfg.burst_steps
    out = []
    for n in cfg.concurrency:
        a, b = ({s.prompt: s.tpot_ms for s in samples if s.part == f"bursts-{steps}" and s.concurrency == n}
                for steps in (short, long))
        both = sorted(a.keys() & b.keys())
        if both:
            out.append({"concurrency": n, "short": short, "long": long, "short_tpot_ms": statistics.mean(a[k] for k in both),
                        "long_tpot_ms": statistics.mean(b[k] for k in both),
                        **ratio_ci([b[k] for k in both], [a[k] for k in both], lower_is_better=True)})
    return out


def _http_summary(samples: list[Sample], cfg: RuntimeBenchConfig) -> list[dict]:
    # HTTP's cost over gRPC = HTTP time per token / gRPC's (1.02 is 2% more).
    return [{"concurrency": n, "grpc_tpot_ms": statistics.mean(grpc_), "http_tpot_ms": statistics.mean(http_),
             **ratio_ci(http_, grpc_, lower_is_better=True)}
            for n, grpc_, http_ in _pairs(samples, cfg, "front-grpc", "front-http")]


def _policy_summary(samples: list[Sample], cfg: RuntimeBenchConfig) -> list[dict]:
    out = []
    pol = [s for s in samples if s.part == "policy"]
    for set_name in ("humaneval", "mt-bench"):
        for n in cfg.concurrency:
            base = {s.prompt: s for s in pol if s.policy == "off" and s.prompt_set == set_name and s.concurrency == n}
            for policy in cfg.policies:
                mine = [s for s in pol if s.policy == policy and s.prompt_set == set_name and s.concurrency == n]
                if not mine:
                    continue
                # Speed against off = off's time per token (or to the first token) / this policy's, per prompt.
                ci = ratio_ci([base[s.prompt].tpot_ms for s in mine], [s.tpot_ms for s in mine])
                first = ratio_ci([base[s.prompt].ttft_ms for s in mine], [s.ttft_ms for s in mine])
                drafted, accepted = sum(s.drafted for s in mine), sum(s.accepted for s in mine)
                out.append({"prompt_set": set_name, "concurrency": n, "policy": policy,
                            "tpot_ms": statistics.mean(s.tpot_ms for s in mine),
                            "ttft_ms": statistics.mean(s.ttft_ms for s in mine), "ttft": first,
                            "acceptance": accepted / drafted if drafted else None, "drafted": drafted, **ci})
    return out


def run(cfg: RuntimeBenchConfig) -> dict:
    from specserve.tokenizer import load_tokenizer

    results: dict = {"machine": machine_facts(), "threads": cfg.threads}
    if "costs" in cfg.parts:
        results["costs"] = cost_table(cfg)
    if {"decode", "policies", "http", "bursts"} & set(cfg.parts):
        stack_parts(cfg, load_tokenizer(cfg.target), results)
    if "serve" in cfg.parts:
        results["serve"] = serve.run_part(cfg)
    if "pages" in cfg.parts and "llama.cpp" in cfg.runtimes:
        results["pages"] = pages.run_part(cfg.target, cfg.threads, cfg.pages_tokens, cfg.pages_rounds)
    if "saves" in cfg.parts and "llama.cpp" in cfg.runtimes:
        results["saves"] = saves.run_part(cfg.target, cfg.threads, cfg.saves_prompt_tokens, cfg.saves_decode_steps,
                                          cfg.saves_rounds)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "runtime.json").write_text(json.dumps(results, indent=1))
    (cfg.out / "runtime.md").write_text(markdown(results))
    return results


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# Runtime benchmark", "",
             f"CPU {m['cpu']}, {m['cores']} cores, flags {' '.join(m['cpu_flags'])}; {r['threads']} threads; "
             f"torch {m['torch']}", ""]
    costs = [c for c in r.get("costs", []) if "positions" in c]
    if costs:
        lines += ["## Cost of one forward (ms)", "", "| runtime | context | sessions | " +
                  " | ".join(f"{p} pos" for p in sorted({c['positions'] for c in costs})) + " |",
                  "| --- | --- | --- |" + " --- |" * len({c['positions'] for c in costs})]
        keys = sorted({(c["runtime"], c["context"], c["sessions"]) for c in costs})
        for key in keys:
            row = [c for c in costs if (c["runtime"], c["context"], c["sessions"]) == key]
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(f"{c['ms']:.0f}" for c in row) + " |")
        for c in r["costs"]:
            if "outside_forward_share" in c:
                lines += ["", f"torch verify step at batch {c['overhead_batch']}, context {c['overhead_context']}: "
                              f"{c['outside_forward_share']:.1%} of the step outside the model forward"]
    lines += _ratio_table(r.get("decode"), "Plain decoding: whole stack vs bare llama-cpp-python",
                          ("stack tokens/s per request", "stack_tokens_per_s"), ("bare tokens/s", "bare_tokens_per_s"),
                          "stack / bare")
    lines += _ratio_table(r.get("http"), "HTTP front vs gRPC (plain decoding, client-side time per output token)",
                          ("gRPC TPOT ms", "grpc_tpot_ms"), ("HTTP TPOT ms", "http_tpot_ms"), "HTTP / gRPC")
    for b in r.get("bursts", [])[:1]:
        lines += _ratio_table(r["bursts"], f"Decode bursts of up to {b['long']} forwards per verify call against "
                              f"{b['short']} (plain decoding, HTTP, time per output token)",
                              (f"{b['short']} TPOT ms", "short_tpot_ms"), (f"{b['long']} TPOT ms", "long_tpot_ms"),
                              f"{b['long']} / {b['short']}")
    if r.get("policies"):
        lines += ["", "## Policies on llama.cpp: speed against `off` (off's time per token, or to the first token, "
                  "over the policy's; each prompt read in full by every policy)", "",
                  "| prompts | concurrent | policy | TPOT ms | acceptance | speed vs off (95% CI) | verdict | TTFT ms "
                  "| first token vs off (95% CI) | verdict |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in r["policies"]:
            acc = f"{p['acceptance']:.2f}" if p["acceptance"] is not None else "-"
            first = p.get("ttft")
            lines.append(f"| {p['prompt_set']} | {p['concurrency']} | {p['policy']} | {p['tpot_ms']:.0f} | {acc} | "
                         f"{p['ratio']:.3f} ({p['low']:.3f}-{p['high']:.3f}) | {p['verdict']} | "
                         + (f"{p['ttft_ms']:.0f} | {first['ratio']:.3f} ({first['low']:.3f}-{first['high']:.3f}) | "
                            f"{first['verdict']} |" if first else "- | - | - |"))
    if r.get("serve"):
        lines += serve.markdown(r["serve"], m, r["threads"])
    if r.get("pages"):
        lines += pages.markdown(r["pages"])
    if r.get("saves"):
        lines += saves.markdown(r["saves"])
    return "\n".join(lines) + "\n"


def _ratio_table(rows: list[dict] | None, title: str, a: tuple[str, str], b: tuple[str, str], ratio: str) -> list[str]:
    """A section with one row per concurrency: two measured columns and their ratio with its CI."""
    if not rows:
        return []
    out = ["", f"## {title}", "", f"| concurrent | {a[0]} | {b[0]} | {ratio} (95% CI) |", "| --- | --- | --- | --- |"]
    for row in rows:
        out.append(f"| {row['concurrency']} | {row[a[1]]:.2f} | {row[b[1]]:.2f} | "
                   f"{row['ratio']:.3f} ({row['low']:.3f}-{row['high']:.3f}) |")
    return out
