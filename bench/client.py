"""The benchmark's client: the same requests, over the same OpenAI-compatible HTTP API, to SpecServe
and to its peers, timed on the client side so every system is measured alike.

One request is streamed from `/v1/completions` with its prompt as token ids and greedy sampling;
TTFT is the time to the first streamed token, TPOT the mean gap between later tokens. A request
meets its SLO when both are within the request's objectives; one the server refused (429, 503) or
failed does not.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx


@dataclass
class Request:
    """One request of a workload: its class, when it is sent (seconds from the replay's start), its
    prompt and output length, and its SLO."""

    klass: str
    index: int
    at: float
    prompt: list[int]
    max_tokens: int
    ttft_slo_ms: float
    tpot_slo_ms: float


@dataclass
class Result:
    system: str
    load: int
    rep: int
    klass: str
    index: int
    sent_s: float  # from the replay's start
    prompt_tokens: int
    max_tokens: int
    status: int = 200
    output_tokens: int = 0
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    total_ms: float = 0.0
    slo_met: bool = False
    drafted: int = 0  # reported by llama-server's timings; SpecServe's come from its step telemetry
    accepted: int = 0
    cached_tokens: int | None = None  # prompt tokens served from a prefix cache, where the server says
    error: str = ""


async def stream(http: httpx.AsyncClient, base_url: str, model: str, req: Request, result: Result,
                 slo_extension: bool) -> Result:
    """Send `req` and fill `result` from the streamed answer."""
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if slo_extension:
        body["slo"] = {"ttft_ms": req.ttft_slo_ms, "tpot_ms": req.tpot_slo_ms}
    started = time.perf_counter()
    stamps: list[float] = []
    usage = 0
    try:
        async with http.stream("POST", f"{base_url}/v1/completions", json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:200]
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"].get("completion_tokens", 0)
                    details = chunk["usage"].get("prompt_tokens_details") or {}
                    result.cached_tokens = details.get("cached_tokens", result.cached_tokens)
                timings = chunk.get("timings") or {}  # llama-server's
                result.cached_tokens = timings.get("cache_n", result.cached_tokens)
                result.drafted = timings.get("draft_n", result.drafted)
                result.accepted = timings.get("draft_n_accepted", result.accepted)
                if any(c.get("text") for c in chunk.get("choices", ())):
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as exc:
        result.status, result.error = 599, f"{type(exc).__name__}: {exc}"
        return result
    done = time.perf_counter()
    result.output_tokens = max(usage, len(stamps))
    result.total_ms = (done - started) * 1000
    if stamps:
        result.ttft_ms = (stamps[0] - started) * 1000
        if result.output_tokens > 1:
            result.tpot_ms = (done - stamps[0]) * 1000 / (result.output_tokens - 1)
    result.slo_met = bool(stamps) and result.ttft_ms <= req.ttft_slo_ms and result.tpot_ms <= req.tpot_slo_ms
    return result


def client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits)


async def replay(base_url: str, model: str, requests: list[Request], system: str, load: int, rep: int,
                 slo_extension: bool) -> tuple[list[Result], float]:
    """Send every request at its time (open loop); returns the results and the replay's duration."""
    async with client(len(requests)) as http:
        t0 = time.perf_counter() + 0.1

        async def one(req: Request) -> Result:
            await asyncio.sleep(max(0.0, t0 + req.at - time.perf_counter()))
            result = Result(system, load, rep, req.klass, req.index, time.perf_counter() - t0, len(req.prompt),
                            req.max_tokens)
            return await stream(http, base_url, model, req, result, slo_extension)

        results = await asyncio.gather(*(one(r) for r in requests))
        return list(results), time.perf_counter() - t0


async def closed_loop(base_url: str, model: str, requests: list[Request], schedule: list[tuple[float, int]],
                      system: str, slo_extension: bool, limit: int | None = None) -> list[Result]:
    """Keep as many requests in flight as the schedule says at each moment ((start second,
    concurrency) pairs, the last marking the end), drawing requests round-robin from `requests`,
    `limit` of them at most; ends when the schedule or the limit has run out and the last request
    has finished."""
    end = schedule[-1][0]
    results: list[Result] = []
    taken = 0

    def wanted(t: float) -> int:
        return next((c for start, c in reversed(schedule) if t >= start), 0) if t < end else 0

    async with client(max(c for _, c in schedule)) as http:
        t0 = time.perf_counter()

        async def worker(slot: int) -> None:
            nonlocal taken
            while (now := time.perf_counter() - t0) < end and (limit is None or taken < limit):
                if slot >= wanted(now):
                    await asyncio.sleep(0.05)  # this slot is off at this point of the ramp
                    continue
                req = requests[taken % len(requests)]
                taken += 1
                result = Result(system, 0, 0, req.klass, req.index, now, len(req.prompt), req.max_tokens)
                results.append(await stream(http, base_url, model, req, result, slo_extension))

        await asyncio.gather(*(worker(i) for i in range(max(c for _, c in schedule))))
    return results
