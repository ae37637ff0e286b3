"""`specserve bench`: replay real request traces against the running system, every policy side by
side in one run.

Steps: start the whole system (as `specserve up` does); measure single-request latency and
capacity with plain decoding; derive the load levels and the SLOs from them; then for each load
level replay the same trace window once per policy, policies in rotated order so machine drift
hits them all; measure the service split's per-step overhead against the engine core in one
process; run Hugging Face assisted generation on the same prompts at batch 1. Results go to
bench/results/ as JSON, a markdown report and PNG plots.
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import redis
from tqdm import tqdm

from bench import prompts as prompt_sets
from bench.replay import Planned, fit_prompt, plan, read_trace, window
from bench.report import position_sums
from specserve.launcher import Stack
from specserve.ops import OPS_PREFIX
from specserve.strategy import STRATEGY_KEY
from specserve.telemetry import STREAM, decode
from specserve.v1 import gateway_pb2, gateway_pb2_grpc

POLICIES = ["off", "static:1", "static:2", "static:3", "static:4", "static:5", "threshold", "smartspec",
            "specserve", "adaptive"]


@dataclass
class BenchConfig:
    target: str
    draft: str
    traces: dict[str, Path]  # class name ("code", "chat") -> trace file
    redis_url: str
    out: Path
    load_factors: tuple[float, ...] = (0.4, 0.9, 1.5)
    requests_per_level: int = 16
    context_tokens: int = 96  # the trace's median context is scaled to this
    max_context_tokens: int = 256
    output_tokens: int = 16  # the trace's median output is scaled to this
    max_output_tokens: int = 32
    window_start: int = 200
    policies: tuple[str, ...] = tuple(POLICIES)
    hf_prompts: int = 3
    max_batch_size: int = 8
    settle_s: float = 1.5  # after switching policy by ops key (the gateway reads them every second)


@dataclass
class RequestResult:
    level: float
    policy: str
    klass: str
    index: int
    sent_at: float
    prompt_tokens: int
    max_new_tokens: int
    status: str = "OK"
    output_tokens: int = 0
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    total_ms: float = 0.0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    steps: int = 0
    slo_attained: bool = False
    ttft_slo_ms: float = 0.0
    tpot_slo_ms: float = 0.0


@dataclass
class Workload:
    """The same requests for every policy at one load level."""

    level: float
    rate: float
    requests: list[tuple[str, Planned, list[int] | None, list[dict] | None]] = field(default_factory=list)


def fresh_policy(stack: Stack, client: redis.Redis) -> None:
    """Every benchmarked policy starts from the same state: the policy service restarted over a
    stream that holds only the model services' start-up profiles, with no strategy published."""
    from services.policy.consumer import GROUP

    stack.services["policy"].stop()
    client.delete(STRATEGY_KEY)
    try:
        client.xgroup_destroy(STREAM, GROUP)
    except redis.ResponseError:
        pass  # no group yet
    stale = [entry_id for entry_id, fields in client.xrange(STREAM) if decode(fields).get("call") != "profile"]
    for start in range(0, len(stale), 1000):
        client.xdel(STREAM, *stale[start : start + 1000])
    stack.restart("policy")


def set_policy(client: redis.Redis, policy: str) -> None:
    mode, _, k = policy.partition(":")
    client.set(OPS_PREFIX + "mode", mode)
    if k:
        client.set(OPS_PREFIX + "static_k", k)


async def send(stub, klass: str, planned: Planned, ids, chat, slo: dict, t0: float, level: float, policy: str
               ) -> RequestResult:
    await asyncio.sleep(max(0.0, t0 + planned.at - time.monotonic()))
    request = gateway_pb2.GenerateRequest(sampling={"max_new_tokens": planned.max_new_tokens}, slo=slo)
    if chat is not None:
        request.messages.messages.extend(gateway_pb2.ChatMessage(**m) for m in chat)
    else:
        request.prompt_token_ids.ids.extend(ids)
    result = RequestResult(level, policy, klass, planned.index, time.monotonic() - t0, planned.prompt_tokens,
                           planned.max_new_tokens, ttft_slo_ms=slo["ttft_ms"], tpot_slo_ms=slo["tpot_ms"])
    try:
        async for message in stub.Generate(request, timeout=600):
            if message.HasField("stats"):
                s = message.stats
                result.output_tokens, result.ttft_ms, result.tpot_ms = s.output_tokens, s.ttft_ms, s.tpot_ms
                result.total_ms, result.steps = s.total_ms, s.steps
                result.draft_tokens, result.accepted_tokens, result.slo_attained = \
                    s.draft_tokens, s.accepted_tokens, s.slo_attained
    except grpc.aio.AioRpcError as exc:
        result.status = exc.code().name
    return result


async def replay(address: str, workload: Workload, slos: dict[str, dict], policy: str) -> list[RequestResult]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        t0 = time.monotonic() + 0.2
        return list(await asyncio.gather(*(
            send(stub, klass, planned, ids, chat, slos[klass], t0, workload.level, policy)
            for klass, planned, ids, chat in workload.requests)))


def build_workloads(cfg: BenchConfig, tokenizer, capacity_rps: float) -> list[Workload]:
    texts = {"code": prompt_sets.humaneval(), "chat": prompt_sets.mt_bench()}
    traces = {k: read_trace(p) for k, p in cfg.traces.items()}
    per_class = max(1, cfg.requests_per_level // len(traces))
    workloads = []
    for level in cfg.load_factors:
        rate = capacity_rps * level
        w = Workload(level, rate)
        for klass, rows in traces.items():
            cut = window(rows, cfg.window_start, per_class)
            med_ctx = statistics.median(r.context for r in cut)
            med_out = statistics.median(r.generated for r in cut)
            for p in plan(cut, rate / len(traces), cfg.context_tokens / med_ctx, cfg.output_tokens / max(med_out, 1),
                          cfg.max_context_tokens, cfg.max_output_tokens):
                text = texts[klass][p.index % len(texts[klass])]
                if klass == "chat":
                    w.requests.append((klass, p, None, [{"role": "user", "content": text[: p.prompt_tokens * 4]}]))
                else:
                    w.requests.append((klass, p, fit_prompt(tokenizer.encode(text), p.prompt_tokens), None))
        w.requests.sort(key=lambda r: r[1].at)
        workloads.append(w)
    return workloads


async def measure_baseline(address: str, tokenizer, n_parallel: int, tokens: int) -> tuple[float, float, float]:
    """(ttft_ms, tpot_ms) of a lone request, and capacity in requests/s with n_parallel at once,
    all with plain decoding."""
    ids = fit_prompt(tokenizer.encode(prompt_sets.humaneval()[0]), 96)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def one():
            last = None
            async for m in stub.Generate(gateway_pb2.GenerateRequest(prompt_token_ids={"ids": ids},
                                                                     sampling={"max_new_tokens": tokens})):
                last = m
            return last.stats

        lone = await one()
        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(n_parallel)))
        return lone.ttft_ms, lone.tpot_ms, n_parallel / (time.monotonic() - started)


def step_records(client: redis.Redis, since: str) -> list[dict]:
    out = []
    for _, fields in client.xrange(STREAM, min=since):
        rec = decode(fields)
        if rec.get("component") == "gateway":
            out.append(rec)
    return out


def split_overhead(cfg: BenchConfig, address: str, client: redis.Redis, tokenizer) -> dict:
    """Per-step time outside the models (scheduling, gRPC, serialization): through the services
    vs the same steps with the engine core in one process. The services run while this runs the
    in-process engine, so each measures its own steps' overhead: step time minus model time."""
    from bench.local import local_scheduler
    from gateway.sequence import Sequence
    from specserve.runtime import open_runtime
    from specserve.contracts import SamplingParams
    from specserve.strategy import Strategy

    ids = fit_prompt(tokenizer.encode(prompt_sets.humaneval()[1]), 96)
    set_policy(client, "static:3")
    time.sleep(cfg.settle_s)
    since = f"{int(time.time() * 1000)}-0"

    async def through_services():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            async for _ in stub.Generate(gateway_pb2.GenerateRequest(prompt_token_ids={"ids": ids},
                                                                     sampling={"max_new_tokens": 24})):
                pass

    asyncio.run(through_services())
    time.sleep(0.5)
    split = step_records(client, since)
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


def hf_assisted(cfg: BenchConfig, tokenizer, workloads: list[Workload]) -> dict:
    """Hugging Face assisted generation at batch 1 on the code prompts of the lightest level,
    against the same requests' latency through the system under `adaptive` at that level."""
    import torch

    from specserve.models import load_causal_lm

    target, draft = load_causal_lm(cfg.target), load_causal_lm(cfg.draft)
    reqs = [r for r in workloads[0].requests if r[0] == "code"][: cfg.hf_prompts]
    out = []
    with torch.inference_mode():
        for _, planned, ids, _ in reqs:
            x = torch.tensor([ids])
            started = time.perf_counter()
            gen = target.generate(x, attention_mask=torch.ones_like(x), assistant_model=draft, do_sample=False,
                                  max_new_tokens=planned.max_new_tokens, pad_token_id=tokenizer.eos_token_id)
            elapsed = (time.perf_counter() - started) * 1000
            out.append({"index": planned.index, "ms": elapsed, "tokens": gen.shape[1] - x.shape[1]})
    return {"requests": out, "ms_per_token": sum(r["ms"] for r in out) / max(1, sum(r["tokens"] for r in out))}


def run(cfg: BenchConfig, quick: bool = False) -> dict:
    from specserve.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.target)
    client = redis.Redis.from_url(cfg.redis_url)
    for key in client.scan_iter(match=OPS_PREFIX + "*"):
        client.delete(key)
    stack = Stack(cfg.target, cfg.draft, cfg.redis_url,
                  extra_env={"SPECSERVE_MAX_BATCH_SIZE": str(cfg.max_batch_size)}).start()
    results: list[RequestResult] = []
    report: dict = {"config": json.loads(json.dumps(asdict(cfg), default=str))}
    try:
        set_policy(client, "off")
        time.sleep(cfg.settle_s)
        ttft0, tpot0, capacity = asyncio.run(measure_baseline(stack.gateway_address, tokenizer,
                                                              cfg.max_batch_size, cfg.output_tokens))
        slos = {"code": {"ttft_ms": round(4 * ttft0), "tpot_ms": round(4 * tpot0)},
                "chat": {"ttft_ms": round(10 * ttft0), "tpot_ms": round(2 * tpot0)}}
        report["baseline"] = {"ttft_ms": ttft0, "tpot_ms": tpot0, "capacity_rps": capacity, "slos": slos}
        workloads = build_workloads(cfg, tokenizer, capacity)
        total = len(workloads) * len(cfg.policies)
        with tqdm(total=total, desc="replay") as bar:
            for w in workloads:
                for turn in range(len(cfg.policies)):
                    # Rotate the order per level so drift does not always favour the same policy.
                    policy = cfg.policies[(turn + int(w.level * 10)) % len(cfg.policies)]
                    fresh_policy(stack, client)
                    set_policy(client, policy)
                    time.sleep(cfg.settle_s)
                    since = f"{int(time.time() * 1000)}-0"
                    started = time.monotonic()
                    batch = asyncio.run(replay(stack.gateway_address, w, slos, policy))
                    duration = time.monotonic() - started
                    recs = step_records(client, since)
                    results.extend(batch)
                    report.setdefault("runs", []).append(summarise_run(w.level, policy, batch, recs, duration))
                    bar.update(1)
        report["split"] = split_overhead(cfg, stack.gateway_address, client, tokenizer)
    finally:
        stack.stop()
        for key in client.scan_iter(match=OPS_PREFIX + "*"):
            client.delete(key)
    report["hf_assisted"] = hf_assisted(cfg, tokenizer, workloads)
    report["machine"] = machine_facts()
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "system.json").write_text(json.dumps({**report, "requests": [asdict(r) for r in results]}, indent=1, default=str))
    from bench.report import write_report

    write_report(report, cfg.out)
    return report


def summarise_run(level: float, policy: str, batch: list[RequestResult], recs: list[dict], duration: float) -> dict:
    """Rates and percentiles of one (load level, policy) replay, derived from raw per-request and
    per-step records."""
    ok = [r for r in batch if r.status == "OK"]

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    attained = [r for r in ok if r.slo_attained]
    drafted = sum(r.draft_tokens for r in ok)
    pos_d = position_sums(r["position_drafted"] for r in recs)
    pos_a = position_sums(r["position_accepted"] for r in recs)
    steps = sum(r.steps for r in ok)
    return {
        "level": level, "policy": policy, "requests": len(batch), "completed": len(ok),
        "rejected": sum(r.status == "RESOURCE_EXHAUSTED" for r in batch),
        "ttft_ms": {q: pct([r.ttft_ms for r in ok], p) for q, p in (("p50", .5), ("p90", .9), ("p99", .99))},
        "tpot_ms": {q: pct([r.tpot_ms for r in ok if r.output_tokens > 1], p)
                    for q, p in (("p50", .5), ("p90", .9), ("p99", .99))},
        "slo_attainment": len(attained) / len(batch) if batch else 0.0,
        "goodput_rps": len(attained) / duration,
        "goodput_tokens_per_s": sum(r.output_tokens for r in attained) / duration,
        "tokens_per_s": sum(r.output_tokens for r in ok) / duration,
        "mean_accepted_length": (sum(r.accepted_tokens for r in ok) + steps) / steps if steps else 0.0,
        "acceptance_rate": sum(r.accepted_tokens for r in ok) / drafted if drafted else None,
        "acceptance_by_position": [a / d if d else None for a, d in zip(pos_a, pos_d)],
        "controller_ms_per_step": statistics.mean(float(r["planner_ms"]) for r in recs) if recs else 0.0,
        "duration_s": duration,
    }


def machine_facts() -> dict:
    import torch
    import transformers

    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma")
    return {"cpu": platform.processor() or platform.machine(), "cores": __import__("os").cpu_count(),
            "cpu_flags": [f for f in wanted if f" {f}" in flags], "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}
