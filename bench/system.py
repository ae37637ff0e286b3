"""`specserve bench`: the policies and the peers on the same requests, under rising load.

1. Start the whole system (as `specserve up` does, models on llama.cpp) and time a lone request of
   the workload's median lengths with plain decoding; the SLOs and the load levels derive from it:
   load c sends c requests per lone-request latency (c = 1 is one request at a time on average).
2. The requests: HumanEval code edits and completions (code) and ShareGPT first turns (conversation),
   with prompt and output lengths as the data give them, capped; each class sent at the arrival
   times of its Azure trace's window, time-scaled to the load.
3. For each repetition and load, every system once, in an order rotated per load and repetition:
   each policy (`off` and `adaptive` unless named; from a fresh policy state: restarted policy
   service, a telemetry stream of start-up profiles only, no strategy) and each llama-server
   variant (`-np` = our maximum batch). Every system gets the same token-id prompts over the same
   OpenAI-compatible HTTP API, timed by the same client. A peer that fails to start is recorded and
   left out of the rest of the run.
4. The load ramp: closed-loop concurrency 1 -> 8 -> 1 with `adaptive`, from the step telemetry.
5. `off` with a drafter configured against a stack without one, alternated request by request.
6. The service split's per-step overhead against the engine in one process.
7. Optionally (`torch_requests`), our torch runtime at 1 and 4 concurrent requests (`off`,
   `adaptive`) and Hugging Face `generate` (plain and with `assistant_model`) at batch 1.

Results: system.json, system.md and PNG plots under the output folder (bench/report.py); the
results so far are saved after every replay (system.partial.json).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import random
import statistics
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import httpx
import redis
from tqdm import tqdm

from bench import peers
from bench import prompts as prompt_sets
from bench.client import Request, Result, closed_loop, replay
from bench.ramp import step_series, switch_stalls, triangle
from bench.replay import arrivals, fit_prompt, read_trace, window
from bench.report import position_sums
from specserve.cpu import cpuinfo
from specserve.launcher import Stack
from specserve.ops import OPS_PREFIX
from specserve.strategy import STRATEGY_KEY, Strategy
from specserve.telemetry import STREAM, decode
from specserve.v1 import gateway_pb2, gateway_pb2_grpc

SUITE_POLICIES = ("off", "adaptive")  # the default policy and plain decoding; --policies adds others
PEERS = tuple(peers.VARIANTS)
# Per request class, the SLO as multiples of a lone request's TTFT and TPOT (plain decoding): code
# completion waits less for its first token, conversation wants a steadier stream.
SLO_SCALES = {"code": (5.0, 5.0), "chat": (10.0, 4.0)}


@dataclass
class BenchConfig:
    target: str
    draft: str
    traces: dict[str, Path]  # class name ("code", "chat") -> trace file
    redis_url: str
    out: Path
    loads: tuple[int, ...] = (1, 2, 4)  # offered concurrency: light, about capacity, past it
    requests: int = 6  # per system, load and repetition, half from each trace
    reps: int = 3
    policies: tuple[str, ...] = SUITE_POLICIES
    # run where `make peers` built llama-server for this CPU (the huge-pages control on request)
    peers: tuple[str, ...] = tuple(p for p in PEERS if p not in peers.VARIANT_ENV)
    max_context_tokens: int = 512  # prompt tokens, as the data give them up to this
    max_output_tokens: int = 64  # output tokens, as the data give them (the answer's length) up to this
    window_start: int = 200  # each trace's arrivals from this row
    seed: int = 0  # the order in which dataset items are drawn
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_batch_size: int = 8
    ramp_policies: tuple[str, ...] = ("adaptive",)  # those that switch speculation on and off
    ramp_peak: int = 8
    ramp_hold_s: float = 5.0
    unused_drafter_pairs: int = 8  # 0 skips the drafter-unused check
    split: bool = True
    torch_requests: int = 0  # > 0 adds the torch runtime and Hugging Face part on that many requests
    settle_s: float = 1.5  # after switching policy by ops key (the gateway reads them every second)


def fresh_policy(stack: Stack, client: redis.Redis) -> None:
    """Every benchmarked policy starts from the same state: the policy service restarted over a
    stream that holds only the model services' start-up profiles, with no strategy published."""
    from services.policy.consumer import GROUP

    stack.services["policy"].stop()
    client.delete(STRATEGY_KEY)
    if client.exists(STREAM):  # without the stream there is no group to destroy
        client.xgroup_destroy(STREAM, GROUP)  # 0 when the group does not exist yet
    stale = [entry_id for entry_id, fields in client.xrange(STREAM) if decode(fields).get("call") != "profile"]
    for start in range(0, len(stale), 1000):
        client.xdel(STREAM, *stale[start : start + 1000])
    stack.restart("policy")


def set_policy(client: redis.Redis, policy: str) -> None:
    mode, _, k = policy.partition(":")
    client.set(OPS_PREFIX + "mode", mode)
    if k:
        client.set(OPS_PREFIX + "static_k", k)


def now_id() -> str:
    return f"{int(time.time() * 1000)}-0"


def step_records(client: redis.Redis, since: str) -> list[tuple[float, dict]]:
    """The gateway's step records since a stream id, with their time (unix seconds, from the id)."""
    out = []
    for entry_id, fields in client.xrange(STREAM, min=since):
        rec = decode(fields)
        if rec.get("component") == "gateway":
            out.append((int(entry_id.decode().split("-")[0]) / 1000, rec))
    return out


def fitted(raw: bytes | None) -> bool:
    """Whether a published strategy carries a cost table measured on this machine."""
    return raw is not None and bool(Strategy.from_json(raw).cost.verify_table)


def served_model(base_url: str) -> str:
    return httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]


def dataset_items(cfg: BenchConfig, tokenizer) -> dict[str, list[tuple[list[int], int]]]:
    """Per request class, `cfg.requests // 2` prompts as token ids, each with its output length as
    the data give it (the answer's tokens, capped at `cfg.max_output_tokens`), in a seeded order:
    code alternates HumanEval code edits (sent through the chat template) and HumanEval completions
    (the bare prompt); conversation takes ShareGPT's first turns through the chat template. Prompts
    within `cfg.max_context_tokens` come first; a longer one is cut to it only where too few fit."""
    rng = random.Random(cfg.seed)
    per_class = max(1, cfg.requests // 2)

    def chat(text: str) -> list[int]:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}]))

    def shuffled(pairs):
        pairs = list(pairs)
        rng.shuffle(pairs)
        return pairs

    edits, completions = shuffled(prompt_sets.humaneval_edits()), shuffled(prompt_sets.humaneval_completions())
    code = [pair for two in zip(((p, chat) for p in edits), ((p, tokenizer.encode) for p in completions))
            for pair in two]
    sources = {"code": code, "chat": [(p, chat) for p in shuffled(prompt_sets.sharegpt())]}
    out = {}
    for klass, pairs in sources.items():
        fitting, longer = [], []
        for (prompt, answer), encode in pairs:
            ids, answer_len = encode(prompt), len(tokenizer.encode(answer))
            if len(ids) < prompt_sets.MIN_LEN or answer_len < prompt_sets.MIN_LEN:  # vLLM's filter
                continue
            item = (ids[: cfg.max_context_tokens], min(cfg.max_output_tokens, answer_len))
            (fitting if len(ids) <= cfg.max_context_tokens else longer).append(item)
            if len(fitting) == per_class:
                break
        out[klass] = (fitting + longer)[:per_class]
    return out


def build_workloads(cfg: BenchConfig, items: dict[str, list[tuple[list[int], int]]], lone_ms: float,
                    slos: dict[str, dict]) -> dict[int, list[Request]]:
    """Per load, the same requests for every system: each class's dataset items sent at the times of
    its trace's window, time-scaled so load c averages c requests per lone-request latency."""
    windows = {klass: window(read_trace(path), cfg.window_start, len(items[klass])) for klass, path in cfg.traces.items()}
    out = {}
    for load in cfg.loads:
        rate = load * 1000 / lone_ms
        reqs = []
        for klass, rows in windows.items():
            for i, (at, (ids, tokens)) in enumerate(zip(arrivals(rows, rate / len(windows)), items[klass])):
                reqs.append(Request(klass, i, at, ids, tokens, **slos[klass]))
        out[load] = sorted(reqs, key=lambda r: r.at)
    return out


def lone_request(base_url: str, model: str, tokenizer, items: dict[str, list[tuple[list[int], int]]],
                 repeats: int = 3) -> dict:
    """Median TTFT, TPOT and latency of a lone request of the workload's median prompt and output
    length (the caller has set plain decoding). Each repeat starts at another token of a HumanEval
    prompt, so none is served from the prefix cache."""
    every = [item for klass in items.values() for item in klass]
    prompt_len = round(statistics.median(len(ids) for ids, _ in every))
    tokens = round(statistics.median(t for _, t in every))
    ids = tokenizer.encode(prompt_sets.humaneval()[0])
    reqs = [Request("code", 0, 0.0, fit_prompt(ids[1 + r :], prompt_len), tokens, float("inf"), float("inf"))
            for r in range(repeats)]
    runs = [asyncio.run(replay(base_url, model, [req], "off", 0, 0, False))[0][0] for req in reqs]
    return {"prompt_tokens": prompt_len, "output_tokens": tokens,
            **{key: statistics.median(getattr(r, key) for r in runs) for key in ("ttft_ms", "tpot_ms", "total_ms")}}


def draft_counts(rows: list[dict]) -> dict:
    """What a run's step records say of its drafts: counts per draft position, summed over
    repetitions in the report (accepted / reached there is the conditional acceptance rate at that
    position), over every draft and the free proposer's; the predicted extra time of exploration
    probes and the time of every step."""
    return {"position_accepted": position_sums(r["position_accepted"] for r in rows),
            **{name: position_sums(r.get(name, ()) for r in rows)
               for name in ("position_reached", "free_position_accepted", "free_position_reached")},
            "explored_ms": sum(float(r.get("probe_ms", 0.0)) for r in rows if r.get("explored") is True),
            "step_ms": sum(float(r["step_ms"]) for r in rows)}


def summarise(system: str, load: int, rep: int, results: list[Result], duration: float,
              recs: list[tuple[float, dict]]) -> dict:
    """One replay of one system: latency percentiles, goodput, SLO attainment and what speculation
    did (from step telemetry for SpecServe, from llama-server's reported counts for the peers)."""

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    ok = [r for r in results if r.status == 200]
    met = [r for r in ok if r.slo_met]
    out = {"system": system, "load": load, "rep": rep, "requests": len(results), "completed": len(ok),
           "refused": sum(r.status in (429, 503) for r in results), "duration_s": duration,
           "ttft_ms": {q: pct([r.ttft_ms for r in ok], p) for q, p in (("p50", .5), ("p99", .99))},
           "tpot_ms": {q: pct([r.tpot_ms for r in ok if r.output_tokens > 1], p) for q, p in (("p50", .5), ("p99", .99))},
           "slo_attainment": len(met) / len(results) if results else 0.0,
           "goodput_tokens_per_s": sum(r.output_tokens for r in met) / duration,
           "tokens_per_s": sum(r.output_tokens for r in ok) / duration}
    if recs:
        rows = [r for _, r in recs]
        sessions = sum(int(r["batch_size"]) for r in rows)
        accepted = sum(sum(int(a) for a in r["accepted"]) for r in rows)
        drafted = sum(sum(int(d) for d in r["drafted"]) for r in rows)
        pos_d = position_sums(r["position_drafted"] for r in rows)
        pos_a = position_sums(r["position_accepted"] for r in rows)
        out.update(mean_accepted_length=(accepted + sessions) / sessions if sessions else 0.0,
                   drafted_slots=drafted, pruned_slots=sum(int(r.get("pruned", 0)) for r in rows),
                   acceptance_rate=accepted / drafted if drafted else None,
                   acceptance_by_position=[a / d if d else None for a, d in zip(pos_a, pos_d)],
                   **draft_counts(rows), k_over_time=[(round(t - recs[0][0], 2), s["k"]) for (t, _), s in zip(recs, step_series(recs))])
    else:
        drafted, accepted = sum(r.drafted for r in ok), sum(r.accepted for r in ok)
        tokens = sum(r.output_tokens for r in ok)
        steps = tokens - accepted  # each step commits its accepted drafts and one token of its own
        out.update(mean_accepted_length=tokens / steps if steps > 0 else 0.0, drafted_slots=drafted,
                   pruned_slots=None, acceptance_rate=accepted / drafted if drafted else None)
    return out


class Bench:
    """One benchmark run: the stack, the Redis client and what has been measured so far."""

    def __init__(self, cfg: BenchConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.client = redis.Redis.from_url(cfg.redis_url)
        self.stack: Stack | None = None
        self.model = ""
        self.results: list[Result] = []
        self.runs: list[dict] = []
        self.failed: dict[str, str] = {}  # peers that did not start, and why
        self.server = peers.find_llama_server()

    def start(self, runtime: str = "llama.cpp", draft: str | None = None, policy: bool = True) -> Stack:
        # Profiled afresh: a cached profile may have been measured while the machine was busy.
        env = {"SPECSERVE_MAX_BATCH_SIZE": str(self.cfg.max_batch_size), "SPECSERVE_RUNTIME": runtime,
               "SPECSERVE_REPROFILE": "true"}
        stack = Stack(self.cfg.target, self.cfg.draft if draft is None else draft, self.cfg.redis_url,
                      extra_env=env, policy=policy).start()
        self.model = served_model(stack.http_address)
        return stack

    def fresh_caches(self) -> None:
        """Restart the model services, so that a replay finds no prompt of an earlier one in the
        prefix cache (each peer starts afresh too); they restart from the profile measured at the
        stack's start."""
        for name in ("verifier", "drafter"):
            if name in self.stack.services:
                self.stack.services[name].env.pop("SPECSERVE_REPROFILE", None)
                self.stack.restart(name)

    def policy_run(self, policy: str, timeout_s: float = 60.0) -> None:
        """Reset the policy state and switch to `policy`; returns once the fresh policy has
        published a strategy fitted to the start-up profiles and the gateway has had time to read
        it and the mode."""
        fresh_policy(self.stack, self.client)
        set_policy(self.client, policy)
        deadline = time.monotonic() + timeout_s
        while not fitted(self.client.get(STRATEGY_KEY)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the policy published no fitted strategy in {timeout_s:.0f} s")
            time.sleep(0.1)
        time.sleep(self.cfg.settle_s)

    def replay(self, system: str, load: int, rep: int, requests: list[Request]) -> None:
        if system in self.failed:
            return
        if system in PEERS:
            log = self.cfg.out / f"{system}.log"
            # The same concurrency limit as ours: its parallel slots are our maximum batch.
            with ExitStack() as up:
                try:
                    url = up.enter_context(peers.llama_server(self.server, system, self.cfg.target, self.cfg.draft,
                                                              self.cfg.max_batch_size, self.cfg.threads, log))
                except (RuntimeError, TimeoutError) as exc:  # it exited, or never answered /health
                    self.failed[system] = str(exc)
                    logging.getLogger(__name__).warning("%s left out: %s", system, exc)
                    return
                results, duration = asyncio.run(replay(url, "peer", requests, system, load, rep, False))
            recs = []
        else:
            self.fresh_caches()
            self.policy_run(system)
            since = now_id()
            results, duration = asyncio.run(replay(self.stack.http_address, self.model, requests, system, load, rep,
                                                   True))
            recs = step_records(self.client, since)
        self.results.extend(results)
        self.runs.append(summarise(system, load, rep, results, duration, recs))

    def ramp(self, requests: list[Request]) -> dict:
        """Closed-loop concurrency 1 -> peak -> 1, once per policy; the per-step series and the
        steps where speculation switched."""
        schedule = triangle(self.cfg.ramp_peak, self.cfg.ramp_hold_s)
        out = {"schedule": schedule, "policies": {}}
        for policy in tqdm(self.cfg.ramp_policies, desc="ramp"):
            self.policy_run(policy)
            since = now_id()
            results = asyncio.run(closed_loop(self.stack.http_address, self.model, requests, schedule, policy, False))
            series = step_series(step_records(self.client, since))
            out["policies"][policy] = {"series": series, "switches": switch_stalls(series),
                                       "requests": len(results), "completed": sum(r.status == 200 for r in results)}
        return out

    def unused_drafter(self, requests: list[Request]) -> dict:
        """`off` on a stack with a drafter (configured, unused) against one without, the same
        requests alternated one at a time; the ratios of their mean latency and TPOT. Both stacks
        are started afresh the same way, each the later started for half the pairs: of two
        identical stacks on one machine, the long-running one or the one started first decoded
        4-10% slower here, whatever it held."""
        self.policy_run("off")
        # No policy service runs meanwhile (both gateways keep the `off` it published), so the two
        # stacks differ by the drafter alone.
        self.stack.services["policy"].stop()
        measured: dict[str, list[Result]] = {"with": [], "without": []}
        pairs, drafts = self.cfg.unused_drafter_pairs, {"with": self.cfg.draft, "without": ""}
        env = {"SPECSERVE_MAX_BATCH_SIZE": str(self.cfg.max_batch_size), "SPECSERVE_RUNTIME": "llama.cpp"}
        stacks: dict[str, Stack] = {}
        try:
            for i in range(pairs):
                if i in (0, pairs // 2):
                    for stack in stacks.values():
                        stack.stop()
                    stacks = {}
                    for name in ("without", "with") if i == 0 else ("with", "without"):  # in this order
                        stacks[name] = Stack(self.cfg.target, drafts[name], self.cfg.redis_url, policy=False,
                                             extra_env=env).start()
                    for stack in stacks.values():  # each reads the chat template's prefix once
                        asyncio.run(replay(stack.http_address, self.model, requests[-1:], "warm-up", 1, 0, False))
                req = requests[i % len(requests)]
                for name in (("with", "without") if i % 2 == 0 else ("without", "with")):
                    measured[name].append(asyncio.run(replay(stacks[name].http_address, self.model, [req], name, 1, 0,
                                                             False))[0][0])
        finally:
            for stack in stacks.values():
                stack.stop()
            self.stack.restart("policy")
        from bench.stats import ratio_ci

        return {key: ratio_ci([getattr(r, key) for r in measured["with"]], [getattr(r, key) for r in measured["without"]],
                              lower_is_better=True) for key in ("total_ms", "tpot_ms")}

    def torch_part(self, requests: list[Request]) -> dict:
        """Our torch runtime at 1 and 4 concurrent requests, then Hugging Face generate at batch 1,
        all on the same requests; ms per output token (client side for the stack)."""
        reqs = requests[: self.cfg.torch_requests]
        out: dict = {"stack": {}}
        self.stack = self.start(runtime="torch")
        try:
            for policy in ("off", "adaptive"):
                self.policy_run(policy)
                for conc in (1, 4):
                    schedule = [(0.0, conc), (float("inf"), 0)]
                    results = asyncio.run(closed_loop(self.stack.http_address, self.model, reqs, schedule, policy,
                                                      False, limit=len(reqs)))
                    ok = [r for r in results if r.status == 200 and r.output_tokens > 1]
                    out["stack"][f"{policy}@{conc}"] = {
                        "tpot_ms": [r.tpot_ms for r in ok], "completed": len(ok),
                        "mean_tpot_ms": statistics.mean(r.tpot_ms for r in ok) if ok else float("nan")}
        finally:
            self.stack.stop()
        out["hf"] = hf_generate(self.cfg, self.tokenizer, reqs)
        return out


def hf_generate(cfg: BenchConfig, tokenizer, requests: list[Request]) -> dict:
    """Hugging Face `generate` at batch 1, plain and with `assistant_model`, on the same requests."""
    import torch

    from specserve.runtime.torch_runtime import load_causal_lm

    target, draft = load_causal_lm(cfg.target), load_causal_lm(cfg.draft)
    out = {}
    with torch.inference_mode():
        for name, extra in (("plain", {}), ("assisted", {"assistant_model": draft})):
            per_token = []
            for req in requests:
                x = torch.tensor([req.prompt])
                started = time.perf_counter()
                gen = target.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                      max_new_tokens=req.max_tokens, pad_token_id=tokenizer.eos_token_id, **extra)
                per_token.append((time.perf_counter() - started) * 1000 / max(1, gen.shape[1] - x.shape[1]))
            out[name] = {"ms_per_token": per_token, "mean_ms_per_token": statistics.mean(per_token)}
    return out


def run(cfg: BenchConfig) -> dict:
    from specserve.tokenizer import load_tokenizer

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    cfg.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(cfg, load_tokenizer(cfg.target))
    for key in bench.client.scan_iter(match=OPS_PREFIX + "*"):
        bench.client.delete(key)
    systems = list(cfg.policies) + ([p for p in cfg.peers] if bench.server else [])
    report: dict = {"config": json.loads(json.dumps(asdict(cfg), default=str)), "machine": machine_facts(),
                    "peers": {"binary": str(bench.server) if bench.server else None,
                              "skipped": [] if bench.server else list(cfg.peers)}}
    bench.stack = bench.start()
    started = time.monotonic()
    try:
        report["versions"] = {name: f"{i.runtime} {Path(i.model_file).name}" for name, i in
                              bench.stack.model_infos().items()}
        bench.policy_run("off")
        items = dataset_items(cfg, bench.tokenizer)
        lone = lone_request(bench.stack.http_address, bench.model, bench.tokenizer, items)
        slos = {klass: {"ttft_slo_ms": round(ttft * lone["ttft_ms"]), "tpot_slo_ms": round(tpot * lone["tpot_ms"])}
                for klass, (ttft, tpot) in SLO_SCALES.items()}
        report["baseline"] = {**lone, "slos": slos}
        workloads = build_workloads(cfg, items, lone["total_ms"], slos)
        with tqdm(total=cfg.reps * len(cfg.loads) * len(systems), desc="replay") as bar:
            for rep in range(cfg.reps):
                for i, load in enumerate(cfg.loads):
                    shift = rep * len(cfg.loads) + i  # rotate so drift does not favour one system
                    for system in systems[shift % len(systems):] + systems[: shift % len(systems)]:
                        bench.replay(system, load, rep, workloads[load])
                        bar.update(1)
                        save(report, bench, started, cfg.out / "system.partial.json")
        middle = workloads[cfg.loads[len(cfg.loads) // 2]]
        if cfg.ramp_policies:
            report["ramp"] = bench.ramp(middle)
        if cfg.unused_drafter_pairs:
            report["unused_drafter"] = bench.unused_drafter(middle)
        if cfg.split:
            report["split"] = split_overhead(cfg, bench.stack.gateway_address, bench.client, bench.tokenizer)
    finally:
        bench.stack.stop()
        for key in bench.client.scan_iter(match=OPS_PREFIX + "*"):
            bench.client.delete(key)
    if cfg.torch_requests:
        report["torch"] = bench.torch_part([r for r in workloads[cfg.loads[0]] if r.klass == "code"])
    save(report, bench, started, cfg.out / "system.json")
    from bench.report import write_report

    write_report(report, cfg.out)
    return report


def save(report: dict, bench: Bench, started: float, path: Path) -> None:
    """The report with the runs and requests so far, written to `path`."""
    report.update(runs=bench.runs, requests=[asdict(r) for r in bench.results],
                  minutes=(time.monotonic() - started) / 60)
    report["peers"]["failed"] = bench.failed
    path.write_text(json.dumps(report, indent=1, default=str))


def split_overhead(cfg: BenchConfig, address: str, client: redis.Redis, tokenizer) -> dict:
    """Per-step time outside the models (scheduling, gRPC, serialization): through the services
    vs the same steps with the engine core in one process. The services run while this runs the
    in-process engine, so each measures its own steps' overhead: step time minus model time."""
    from gateway.backends.local import local_scheduler
    from gateway.sequence import Sequence
    from specserve.contracts import SamplingParams
    from specserve.runtime import open_runtime
    from specserve.strategy import Strategy

    ids = fit_prompt(tokenizer.encode(prompt_sets.humaneval()[1]), 96)
    set_policy(client, "static:3")
    time.sleep(cfg.settle_s)
    since = now_id()

    async def through_services():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            async for _ in stub.Generate(gateway_pb2.GenerateRequest(prompt_token_ids={"ids": ids},
                                                                     sampling={"max_new_tokens": 24})):
                pass

    asyncio.run(through_services())
    time.sleep(0.5)
    split = [r for _, r in step_records(client, since)]
    records = []
    target, draft = open_runtime(cfg.target), open_runtime(cfg.draft)

    async def in_process():
        sch = local_scheduler(target, draft, tokenizer, [tokenizer.eos_token_id],
                              strategy=Strategy(mode="static", static_k=3), on_step=records.append)
        sch.start()
        seq = Sequence("s", ids, SamplingParams(max_new_tokens=24))
        sch.submit(seq)
        while not (await seq.out.get()).finish:
            pass
        await sch.stop()

    asyncio.run(in_process())
    local = [asdict(r) for r in records]

    def mean(recs: list[dict], key) -> float:
        return statistics.mean(key(r) for r in recs) if recs else float("nan")

    def overhead(r: dict) -> float:  # step time outside the two models
        return float(r["step_ms"]) - float(r["draft_ms"]) - float(r["verify_ms"])

    split_step, local_step = mean(split, lambda r: float(r["step_ms"])), mean(local, lambda r: r["step_ms"])
    split_over, local_over = mean(split, overhead), mean(local, overhead)
    return {"steps_split": len(split), "steps_local": len(records), "step_ms_split": split_step,
            "step_ms_local": local_step, "overhead_ms_split": split_over, "overhead_ms_local": local_over,
            "split_cost_fraction": (split_over - local_over) / local_step if records else float("nan")}


def machine_facts() -> dict:
    import llama_cpp
    import torch
    import transformers

    flags = cpuinfo("flags").split()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    model = cpuinfo("model name") or platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "cpu_flags": [f for f in wanted if f in flags],
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "llama_cpp_python": llama_cpp.__version__}
