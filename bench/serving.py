"""`specserve bench serve` (also `python -m bench serve`): a load generator for any OpenAI-compatible
server, with the flags, metrics and result format of vLLM's `vllm bench serve`, so that its numbers
compare with those of vLLM's tool against ours, llama-server, vLLM or TGI.

Requests are streamed (one async client, a fresh connection each: llama-server may drop a
kept-alive connection) at the arrival times of a Poisson or gamma process (`--request-rate`,
`--burstiness`), of a ramp (`--ramp-up-*`) or of a trace (the Azure datasets), at most
`--max-concurrency` in flight. Per request: TTFT is the time to the first chunk with content, ITL
every gap between chunks with content, E2E the time to the last chunk, TPOT (E2E - TTFT) over the
output tokens after the first; output tokens come from the final `usage` where the server sends it,
else they are the content chunks. Token lengths of text come from `--tokenizer` (a local folder with
the server's tokenizer.json) and are estimated at four characters a token without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from bench import prompts
from bench.replay import arrivals, read_trace, window

DATASETS = ("sharegpt", "mt-bench", "humaneval", "humaneval-edit", "random", "azure-code", "azure-conv")
TRACE_FILES = {"azure-code": "azure_llm_2023_code.csv", "azure-conv": "azure_llm_2023_conv.csv"}
METRICS = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
           "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency")}
CHARS_PER_TOKEN = 4  # the usual estimate for English text and code, where no tokenizer is given


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specserve bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", default=None, help="default: the first id from GET /v1/models")
    p.add_argument("--tokenizer", default=None, help="a local folder with the server's tokenizer.json")
    p.add_argument("--dataset-name", default="random", choices=DATASETS)
    p.add_argument("--dataset-path", default=None,
                   help="azure-*: the folder of the trace CSVs; sharegpt: a JSON file (default: the packaged one)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=None,
                   help="output tokens of every request (default: as the data give them; mt-bench: --max-output-len)")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--max-input-len", type=int, default=2048)
    p.add_argument("--max-output-len", type=int, default=256)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests per second (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the inter-arrival times (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ramp-up-strategy", default=None, choices=["linear", "exponential"])
    p.add_argument("--ramp-up-start-rps", type=float, default=None)
    p.add_argument("--ramp-up-end-rps", type=float, default=None)
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs in ms (ttft, tpot, e2el); a request is good within all of them (DistServe)")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl", help="of ttft, tpot, itl, e2el")
    p.add_argument("--metric-percentiles", default="99")
    p.add_argument("--num-warmups", type=int, default=0)
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-dir", default=None)
    p.add_argument("--result-filename", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags as vLLM checks them; `goodput`, `percentile_metrics` and
    `metric_percentiles` come back parsed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.goodput = parse_goodput(args.goodput or [])
    except ValueError as exc:
        parser.error(f"--goodput: {exc}")
    args.percentile_metrics = [m for m in args.percentile_metrics.split(",") if m]
    if unknown := [m for m in args.percentile_metrics if m not in METRICS]:
        parser.error(f"--percentile-metrics: unknown {', '.join(unknown)} (of {', '.join(METRICS)})")
    args.metric_percentiles = [float(p) for p in args.metric_percentiles.split(",") if p]
    if not all(0 <= p <= 100 for p in args.metric_percentiles):
        parser.error("--metric-percentiles: each within 0-100")
    if args.burstiness <= 0 or args.request_rate <= 0:
        parser.error("--burstiness and --request-rate must be positive")
    if args.max_concurrency is not None and args.max_concurrency <= 0:
        parser.error("--max-concurrency must be positive")
    if args.ramp_up_strategy:
        if args.request_rate != math.inf:
            parser.error("--ramp-up-strategy sets the rate: leave out --request-rate")
        if args.ramp_up_start_rps is None or args.ramp_up_end_rps is None:
            parser.error("--ramp-up-strategy needs --ramp-up-start-rps and --ramp-up-end-rps")
        if not 0 < args.ramp_up_start_rps <= args.ramp_up_end_rps:
            parser.error("ramp-up: 0 < --ramp-up-start-rps <= --ramp-up-end-rps")
    if args.dataset_name in TRACE_FILES:
        if not args.dataset_path:
            parser.error(f"--dataset-path: the folder holding {TRACE_FILES[args.dataset_name]}")
        if args.ramp_up_strategy:
            parser.error("the Azure datasets take their arrival times from the trace: no ramp-up")
    if args.dataset_name == "random" and args.endpoint == "/v1/chat/completions" and not args.tokenizer:
        parser.error("random prompts are token ids: the chat endpoint needs --tokenizer to turn them into text")
    return args


def parse_goodput(pairs: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"{pair!r}: give KEY:MS pairs with KEY one of ttft, tpot, e2el")
        out[name] = float(value)
        if out[name] < 0:
            raise ValueError(f"{pair!r}: an SLO is not negative")
    return out


# --- Token lengths -------------------------------------------------------------------------------

class Lengths:
    """Token counts and prompts of a given length: exact with the server's tokenizer, estimated at
    CHARS_PER_TOKEN without it."""

    def __init__(self, folder: str | None):
        self.tok = None
        if folder:
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))

    @functools.cached_property
    def ordinary_ids(self) -> list[int]:
        special = set(self.tok.get_added_tokens_decoder())
        return [i for i in range(self.tok.get_vocab_size()) if i not in special]

    def count(self, text: str) -> int:
        if self.tok:
            return len(self.tok.encode(text, add_special_tokens=False).ids)
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def fit(self, text: str, n: int) -> str:
        """`text` cut to `n` tokens, or repeated until it is that long."""
        if self.tok:
            ids = self.tok.encode(text, add_special_tokens=False).ids
            return self.tok.decode((ids * math.ceil(n / len(ids)))[:n])
        chars = n * CHARS_PER_TOKEN
        return (text * math.ceil(chars / len(text)))[:chars]

    def random_ids(self, rng: random.Random, n: int) -> list[int]:
        """`n` random token ids: the tokenizer's ordinary tokens, or without one ids that every
        common vocabulary (32k tokens and up) holds."""
        if self.tok:
            return [rng.choice(self.ordinary_ids) for _ in range(n)]
        return [rng.randrange(1000, 30000) for _ in range(n)]


# --- Datasets ------------------------------------------------------------------------------------

@dataclass
class SampleRequest:
    prompt: str | list[int]  # text, or token ids (random prompts on /v1/completions)
    prompt_len: int
    output_len: int
    at: float | None = None  # trace datasets: seconds from the start


def load_dataset(args: argparse.Namespace, lengths: Lengths) -> list[SampleRequest]:
    """`args.num_prompts` requests of the dataset, input and output lengths within the caps."""
    rng = random.Random(args.seed)
    name, n = args.dataset_name, args.num_prompts
    if name == "random":
        return random_requests(rng, lengths, n, min(args.random_input_len, args.max_input_len),
                               min(args.output_len or args.random_output_len, args.max_output_len),
                               as_text=args.endpoint == "/v1/chat/completions")
    if name in TRACE_FILES:
        return trace_requests(Path(args.dataset_path) / TRACE_FILES[name], lengths, n, args.request_rate,
                              args.max_input_len, args.max_output_len,
                              prompts.humaneval() if name == "azure-code" else prompts.mt_bench())
    if name == "sharegpt":
        pairs = prompts.sharegpt(Path(args.dataset_path) if args.dataset_path else None)
    elif name == "mt-bench":
        pairs = [(first, None) for first, _ in prompts.mt_bench_turns()]
    elif name == "humaneval":
        pairs = prompts.humaneval_completions()
    else:
        pairs = prompts.humaneval_edits()
    return text_requests(pairs, rng, lengths, n, args.output_len or (args.max_output_len if name == "mt-bench" else None),
                         args.max_input_len, args.max_output_len)


def text_requests(pairs: list[tuple[str, str | None]], rng: random.Random, lengths: Lengths, n: int,
                  output_len: int | None, max_input: int, max_output: int) -> list[SampleRequest]:
    """Prompts with output lengths from their answers (or `output_len`), in a seeded random order
    (cycled where the set is smaller than `n`). Like vLLM's ShareGPT sampling, a pair with fewer than
    MIN_LEN tokens on either side, or a prompt over `max_input`, is left out rather than cut."""
    order = list(pairs)
    rng.shuffle(order)
    kept: list[SampleRequest] = []
    for prompt, answer in order:
        prompt_len = lengths.count(prompt)
        wanted = output_len or lengths.count(answer or "")
        if prompt_len < prompts.MIN_LEN or prompt_len > max_input or wanted < (1 if output_len else prompts.MIN_LEN):
            continue
        kept.append(SampleRequest(prompt, prompt_len, min(wanted, max_output)))
        if len(kept) == n:
            break
    return [kept[i % len(kept)] for i in range(n)] if kept else []


def random_requests(rng: random.Random, lengths: Lengths, n: int, input_len: int, output_len: int,
                    as_text: bool) -> list[SampleRequest]:
    """vLLM's random dataset at a fixed length: token-id prompts, sent as ids to /v1/completions
    (exact length, no tokenizer needed) and as their text to the chat endpoint."""
    out = []
    for _ in range(n):
        ids = lengths.random_ids(rng, input_len)
        out.append(SampleRequest(lengths.tok.decode(ids) if as_text else ids, input_len, output_len))
    return out


def trace_requests(path: Path, lengths: Lengths, n: int, rate: float, max_input: int, max_output: int,
                   texts: list[str]) -> list[SampleRequest]:
    """The first `n` requests of an Azure trace: their arrival times (stretched or squeezed to
    average `rate` requests a second, if finite) and lengths (capped), with prompts made of
    `texts` fitted to the length."""
    rows = window(read_trace(path), 0, n)
    out = []
    for i, (row, at) in enumerate(zip(rows, arrivals(rows, rate))):
        length = max(1, min(row.context, max_input))
        prompt = lengths.fit(texts[i % len(texts)], length)
        out.append(SampleRequest(prompt, lengths.count(prompt) if lengths.tok else length,
                                 max(1, min(row.generated, max_output)), at=at))
    return out


# --- Arrivals ------------------------------------------------------------------------------------

def request_rate_at(i: int, n: int, rate: float, ramp: str | None, start_rps: float | None,
                    end_rps: float | None) -> float:
    """The rate for request `i` of `n`: constant, or ramped linearly or exponentially from start to
    end over the requests (vLLM's ramp-up)."""
    if not ramp:
        return rate
    progress = i / max(n - 1, 1)
    if ramp == "linear":
        return start_rps + (end_rps - start_rps) * progress
    return start_rps * (end_rps / start_rps) ** progress


def arrival_times(n: int, rate: float, burstiness: float = 1.0, ramp: str | None = None,
                  start_rps: float | None = None, end_rps: float | None = None, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) as vLLM draws them: gamma-distributed gaps with shape
    `burstiness` and mean 1/rate (exponential, so Poisson arrivals, at burstiness 1), accumulated;
    at a constant rate rescaled so that the last lands at n / rate, which keeps throughput from
    varying with the seed."""
    rng = np.random.default_rng(seed)
    gaps = []
    for i in range(n):
        r = request_rate_at(i, n, rate, ramp, start_rps, end_rps)
        gaps.append(0.0 if r == math.inf else float(rng.gamma(burstiness, 1.0 / (r * burstiness))))
    times = list(itertools.accumulate(gaps))
    if not ramp and times and times[-1] > 0:
        times = [t * (n / rate) / times[-1] for t in times]
    return times


# --- Requests ------------------------------------------------------------------------------------

@dataclass
class RequestOutput:
    """One request as the client saw it; times in seconds, as vLLM's raw lists are."""

    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    generated_text: str = ""
    error: str = ""


async def send(http: httpx.AsyncClient, url: str, body: dict, chat: bool, req: SampleRequest) -> RequestOutput:
    """Stream one request and time its chunks."""
    out = RequestOutput(req.prompt_len)
    chunks = usage = 0
    last = 0.0
    started = out.start_time = time.perf_counter()
    try:
        async with http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
                return out
            async for line in response.aiter_lines():
                data = line[5:].strip() if line.startswith("data:") else ""
                if not data or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = str(chunk["error"])[:200]
                    return out
                now = time.perf_counter()
                choice = (chunk.get("choices") or [{}])[0]
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if text:
                    if chunks:
                        out.itl.append(now - last)
                    else:
                        out.ttft = now - started
                    chunks, last = chunks + 1, now
                    out.generated_text += text
                if chunk.get("usage"):
                    usage = chunk["usage"].get("completion_tokens") or 0
                out.latency = now - started  # the last chunk, usage included, ends the request
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    out.output_tokens = usage or chunks
    out.success = chunks > 0
    out.error = "" if chunks else "no content streamed"
    return out


def request_body(args: argparse.Namespace, model: str, req: SampleRequest) -> dict:
    body = {"model": model, "max_tokens": req.output_len, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if args.ignore_eos:
        body["ignore_eos"] = True  # vLLM's and llama-server's extension; ours ignores unknown fields
    return body


async def first_model(http: httpx.AsyncClient, base_url: str) -> str:
    response = await http.get(f"{base_url}/v1/models")
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise SystemExit(f"{base_url}/v1/models lists no model")
    return models[0]["id"]


async def benchmark(args: argparse.Namespace, requests: list[SampleRequest]) -> dict:
    """Send the requests on their schedule; returns vLLM's result fields with the run's settings."""
    base_url = args.base_url.rstrip("/")
    url, chat = base_url + args.endpoint, args.endpoint == "/v1/chat/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=30.0), limits=limits) as http:
        model = args.model or await first_model(http, base_url)
        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()

        async def limited(req: SampleRequest, bar: tqdm | None = None) -> RequestOutput:
            async with gate:
                out = await send(http, url, request_body(args, model, req), chat, req)
            if bar is not None:
                bar.update()
            return out

        if args.num_warmups and requests:
            print(f"Warming up with {args.num_warmups} requests...")
            await asyncio.gather(*(limited(requests[0]) for _ in range(args.num_warmups)))
        if requests and requests[0].at is not None:
            times, shape = [r.at for r in requests], "trace arrival times"
        else:
            times = arrival_times(len(requests), args.request_rate, args.burstiness, args.ramp_up_strategy,
                                  args.ramp_up_start_rps, args.ramp_up_end_rps, args.seed)
            shape = (f"ramp-up {args.ramp_up_strategy} {args.ramp_up_start_rps} -> {args.ramp_up_end_rps} RPS"
                     if args.ramp_up_strategy else f"request rate {args.request_rate}, burstiness {args.burstiness}")
        print(f"Traffic: {shape}; maximum request concurrency: {args.max_concurrency}")
        bar = tqdm(total=len(requests), disable=args.disable_tqdm)
        start = time.perf_counter()
        tasks = []
        for req, at in zip(requests, times):
            if (delay := start + at - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(req, bar)))
        outputs = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        bar.close()
    metrics = calculate_metrics(outputs, duration, args.metric_percentiles, args.goodput, args.percentile_metrics)
    settings = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": backend(args), "base_url": base_url,
                "endpoint": args.endpoint, "model_id": model, "tokenizer_id": args.tokenizer,
                "dataset_name": args.dataset_name, "num_prompts": len(requests),
                "request_rate": args.request_rate if args.request_rate != math.inf else "inf",
                "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
                "ramp_up_strategy": args.ramp_up_strategy, "ramp_up_start_rps": args.ramp_up_start_rps,
                "ramp_up_end_rps": args.ramp_up_end_rps}
    return {**settings, **metrics}


def backend(args: argparse.Namespace) -> str:
    """vLLM's backend name for the endpoint, its default label in result file names."""
    return "openai-chat" if args.endpoint == "/v1/chat/completions" else "openai"


# --- Metrics -------------------------------------------------------------------------------------

def calculate_metrics(outputs: list[RequestOutput], duration_s: float, percentiles: list[float],
                      goodput: dict[str, float], selected: list[str]) -> dict:
    """vLLM's benchmark_serving metrics. Over successful requests: TPOT per request is (E2E - TTFT)
    over (output tokens - 1), for those of two tokens or more; ITL pools every gap of every
    request. A request is good when within every SLO given (its TPOT counted 0 below two
    tokens, as vLLM does). Latency statistics in ms for the metrics in `selected`."""
    ok = [o for o in outputs if o.success]
    output_lens = [o.output_tokens if o.success else 0 for o in outputs]
    total_input, total_output = sum(o.prompt_len for o in ok), sum(output_lens)
    all_tpots = [(o.latency - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else 0.0 for o in ok]
    values = {"ttft": [o.ttft for o in ok],
              "tpot": [t for o, t in zip(ok, all_tpots) if o.output_tokens > 1],
              "itl": [gap for o in ok for gap in o.itl],
              "e2el": [o.latency for o in ok]}
    per_request = {"ttft": values["ttft"], "tpot": all_tpots, "e2el": values["e2el"]}
    good = sum(all(per_request[k][i] * 1000 <= slo for k, slo in goodput.items()) for i in range(len(ok)))
    result = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": good / duration_s if goodput else None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": output_lens,
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "latencies": [o.latency for o in outputs],
        "errors": [o.error for o in outputs],
    }
    for name in selected:
        xs = values[name] or [0.0]  # vLLM reports 0 where nothing was measured
        result[f"mean_{name}_ms"] = float(np.mean(xs)) * 1000
        result[f"median_{name}_ms"] = float(np.median(xs)) * 1000
        result[f"std_{name}_ms"] = float(np.std(xs)) * 1000
        for p in percentiles:
            result[f"p{percentile_word(p)}_{name}_ms"] = float(np.percentile(xs, p)) * 1000
    return result


def percentile_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def result_block(r: dict, args: argparse.Namespace) -> str:
    """The result as vLLM prints it."""
    def row(label: str, value, fmt: str = "") -> str:
        return f"{label:<40} {value:<10{fmt}}"

    lines = [f"{' Serving Benchmark Result ':=^50}", row("Successful requests:", r["completed"]),
             row("Failed requests:", r["failed"])]
    if args.max_concurrency is not None:
        lines.append(row("Maximum request concurrency:", args.max_concurrency))
    if args.request_rate != math.inf:
        lines.append(row("Request rate configured (RPS):", args.request_rate, ".2f"))
    lines += [row("Benchmark duration (s):", r["duration"], ".2f"), row("Total input tokens:", r["total_input_tokens"]),
              row("Total generated tokens:", r["total_output_tokens"]),
              row("Request throughput (req/s):", r["request_throughput"], ".2f")]
    if r["request_goodput"] is not None:
        lines.append(row("Request goodput (req/s):", r["request_goodput"], ".2f"))
    lines += [row("Output token throughput (tok/s):", r["output_throughput"], ".2f"),
              row("Total Token throughput (tok/s):", r["total_token_throughput"], ".2f")]
    for name in METRICS:
        if name not in args.percentile_metrics:
            continue
        short, header = METRICS[name]
        lines += [f"{header:-^50}", row(f"Mean {short} (ms):", r[f"mean_{name}_ms"], ".2f"),
                  row(f"Median {short} (ms):", r[f"median_{name}_ms"], ".2f")]
        for p in args.metric_percentiles:
            lines.append(row(f"P{percentile_word(p)} {short} (ms):", r[f"p{percentile_word(p)}_{name}_ms"], ".2f"))
    lines.append("=" * 50)
    return "\n".join(lines)


def result_path(args: argparse.Namespace, r: dict) -> Path:
    """vLLM's file name unless --result-filename: {backend}-{rate}qps[-concurrency{N}]-{model}-{date}.json."""
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
    name = args.result_filename or (
        f"{r['backend']}-{args.request_rate}qps{concurrency}-{r['model_id'].split('/')[-1]}-{r['date']}.json")
    return Path(args.result_dir or ".") / name


def machine() -> dict:
    from bench.system import machine_facts  # torch and llama.cpp's versions: imported only to save

    return machine_facts()


async def run(args: argparse.Namespace) -> dict:
    requests = load_dataset(args, Lengths(args.tokenizer))
    if not requests:
        raise SystemExit(f"{args.dataset_name}: no request within the length caps")
    if len(requests) < args.num_prompts:
        print(f"{args.dataset_name}: {len(requests)} requests within the length caps (of {args.num_prompts} asked)")
    result = await benchmark(args, requests)
    print(result_block(result, args))
    if args.save_result:
        path = result_path(args, result)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
        print(f"Saved {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    asyncio.run(run(parse_args(argv)))
    return 0
