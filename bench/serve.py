"""Part `serve` of `specserve bench runtime`: our whole stack against llama.cpp's `llama-server` as
a new user meets both, on the same GGUF file, kernels and thread count.

Eight chat requests of our own (four fresh generations, four code edits whose answer copies most of
the prompt) go to `/v1/chat/completions`, greedy and streamed with usage. At each concurrency C, C
clients each send the eight in turn from different offsets (closed loop), for a few rounds; within a
round the systems take turns (one at a time, order rotated per round). Every server stays up for
the whole part, idle while another runs, with the same batch limit (our max batch size, its `-np`).
Then two-turn MT-Bench conversations measure prefix reuse across turns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import statistics
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import httpx
import redis

from bench import peers
from bench import prompts as prompt_sets
from bench.prompts import humaneval_solution
from bench.report import Pooled, acceptance_table
from bench.stats import ratio_ci
from specserve.telemetry import FLUSH_EVERY_S

PEER = "llama-server"
FRESH = (
    "Write a Python function that returns the n-th Fibonacci number, computed iteratively.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation.",
    "Write a Python function that merges two sorted lists into one sorted list without calling sort().",
    "Write a Python function that splits one line of CSV into its fields, honouring double-quoted fields.",
)
# (HumanEval task, variable, new name): 20-30 line functions, so the answer is mostly the prompt.
EDITS = (
    ("HumanEval/1", "current_depth", "depth"),
    ("HumanEval/20", "closest_pair", "best_pair"),
    ("HumanEval/25", "fact", "factors"),
    ("HumanEval/140", "new_text", "result"),
)
WARM_UP = "Say hello."  # not one of the eight, so warming up caches none of their prompts


def workload(kind: str = "all") -> list[str]:
    """The eight prompts: fresh generations, then the edits (`kind`: all, fresh or edits)."""
    edits = []
    for task, old, new in EDITS:
        code = humaneval_solution(task).strip("\n")
        assert re.search(rf"\b{old}\b", code), f"{task} has no variable {old}"
        edits.append(f"Rename the variable {old} to {new} in this function and reply with the whole function:\n\n"
                     f"```python\n{code}\n```")
    return {"all": [*FRESH, *edits], "fresh": list(FRESH), "edits": edits}[kind]


@dataclass
class Reply:
    """One request as the client saw it: times from sending, counts from the final usage."""

    system: str
    concurrency: int
    round: int
    client: int
    prompt: int
    text: str = ""
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    ttft_ms: float = math.nan
    e2e_ms: float = math.nan
    error: str = ""
    first_read: bool = False  # the first time this prompt reached its server (no prefix cache holds it)

    @property
    def tpot_ms(self) -> float | None:
        return tpot_ms(self.e2e_ms, self.ttft_ms, self.output_tokens)

    @property
    def rate(self) -> float:
        """The request's own tokens per second: its output tokens over its whole time, first token included."""
        return self.output_tokens / self.e2e_ms * 1000 if self.e2e_ms > 0 else math.nan


def tpot_ms(e2e_ms: float, ttft_ms: float, output_tokens: int) -> float | None:
    """vLLM's time per output token: the time after the first token over the tokens after it."""
    return (e2e_ms - ttft_ms) / (output_tokens - 1) if output_tokens > 1 else None


async def chat(http: httpx.AsyncClient, base_url: str, model: str, prompt: str | list[dict], max_tokens: int,
               reply: Reply) -> Reply:
    """Stream one greedy chat request into `reply` (`prompt`: the user's message, or the whole
    conversation). TTFT is the first chunk with content; E2E the last chunk (the usage one), as
    vLLM's benchmark times it."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    body = {"model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    try:
        async with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                reply.error = f"{response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
                return reply
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    reply.error = str(chunk["error"])[:200]
                    return reply
                now = (time.perf_counter() - started) * 1000
                text = "".join(c.get("delta", {}).get("content") or "" for c in chunk.get("choices") or ())
                if text and math.isnan(reply.ttft_ms):
                    reply.ttft_ms = now
                reply.text += text
                reply.e2e_ms = now
                if usage := chunk.get("usage"):
                    reply.output_tokens, reply.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
                    reply.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    except httpx.HTTPError as exc:
        reply.error = f"{type(exc).__name__}: {exc}"
    if not reply.error and (not reply.text or not reply.output_tokens):
        reply.error = "no content" if not reply.text else "no usage in the stream"
    return reply


async def closed_loop(base_url: str, model: str, prompts: list[str], clients: int, max_tokens: int, system: str,
                      round_: int) -> tuple[list[Reply], float]:
    """`clients` clients each send every prompt in turn, client c from prompt c * len / clients on;
    returns the replies and the wall time of the whole round."""
    # A fresh connection per request: llama-server may close a kept-alive connection after a stream,
    # and a request sent on it as it closes fails ("Server disconnected").
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as http:
        async def client(c: int) -> list[Reply]:
            out = []
            for i in range(len(prompts)):
                p = (c * len(prompts) // clients + i) % len(prompts)
                out.append(await chat(http, base_url, model, prompts[p], max_tokens,
                                      Reply(system, clients, round_, c, p)))
            return out

        started = time.perf_counter()
        per_client = await asyncio.gather(*(client(c) for c in range(clients)))
        return [r for replies in per_client for r in replies], time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    """Nearest rank, as the system benchmark reports its percentiles."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else math.nan


def p50(values) -> float:
    return percentile(list(values), 0.5)


def p99(values) -> float:
    return percentile(list(values), 0.99)


def system_stats(replies: list[Reply], rounds: list[dict]) -> dict:
    """One system at one concurrency: throughput per round (all output tokens over the round's
    wall time), latency percentiles over its requests, the mean prompt and cached tokens."""
    ok = [r for r in replies if not r.error]
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    rates = [rd["output_tokens"] / rd["wall_s"] for rd in rounds]
    return {"tokens_per_s": statistics.mean(rates) if rates else math.nan,
            "ttft_p50_ms": p50(r.ttft_ms for r in ok), "ttft_p99_ms": p99(r.ttft_ms for r in ok),
            "tpot_p50_ms": p50(r.tpot_ms for r in ok if r.tpot_ms is not None),
            "prompt_tokens_mean": statistics.mean(r.prompt_tokens for r in ok) if ok else math.nan,
            "cached_tokens_mean": statistics.mean(cached) if cached else None,
            "requests": len(replies), "errors": len(replies) - len(ok)}


def compare(ours: list[Reply], peer: list[Reply], ours_rounds: list[dict], peer_rounds: list[dict]) -> dict:
    """Ours / peer with paired bootstrap intervals: throughput paired by round, latencies by request
    (the same client, prompt and round on both). TTFTs pair only requests that found their prompt
    alike: our policies share one stack and its prefix cache, so the first of them to send a prompt
    reads it while the next finds it cached, and each peer reads it afresh."""
    tps = {rd["round"]: rd["output_tokens"] / rd["wall_s"] for rd in peer_rounds}
    rounds = [rd for rd in ours_rounds if rd["round"] in tps]
    theirs = {(r.round, r.client, r.prompt): r for r in peer if not r.error}
    pairs = [(r, theirs[(r.round, r.client, r.prompt)]) for r in ours if not r.error and (r.round, r.client, r.prompt)
             in theirs]
    timed = [(a, b) for a, b in pairs if a.tpot_ms is not None and b.tpot_ms is not None]
    alike = [(a, b) for a, b in pairs if a.first_read == b.first_read]  # for the TTFT and every time holding it
    return {"tokens_per_s": ratio_ci([rd["output_tokens"] / rd["wall_s"] for rd in rounds],
                                     [tps[rd["round"]] for rd in rounds]),
            **{name: ratio_ci([a.ttft_ms for a, _ in alike], [b.ttft_ms for _, b in alike], stat=stat,
                              lower_is_better=True) for name, stat in (("ttft_p50", p50), ("ttft_p99", p99))},
            "tpot_p50": ratio_ci([a.tpot_ms for a, _ in timed], [b.tpot_ms for _, b in timed], stat=p50,
                                 lower_is_better=True),
            "rate_p50": ratio_ci([a.rate for a, _ in alike], [b.rate for _, b in alike], stat=p50)}


def greedy_matches(ours: list[Reply], peer: list[Reply]) -> dict:
    """Of the prompts both systems answered in the first round (at one client), how many got the
    same greedy text from both."""
    first = [{r.prompt: r.text for r in replies if r.round == 0 and not r.error} for replies in (ours, peer)]
    both = first[0].keys() & first[1].keys()
    return {"matching": sum(first[0][p] == first[1][p] for p in both), "compared": len(both)}


def summarise(replies: list[Reply], rounds: list[dict], ours: list[str], peers_: list[str],
              concurrency: tuple[int, ...], kinds: tuple[str, ...] = ()) -> dict:
    """Rows per concurrency and system, ratios of each of ours to each peer and to our first policy
    (speculation against plain decoding), greedy matches at 1, and where the prompts are of several
    `kinds` (the kind of each prompt by index), per kind the TPOT and each request's own tokens per
    second (its output over its whole time, as a client sees it), with their ratios."""
    rows, ratios, greedy, by_kind = [], [], {}, []
    for n in concurrency:
        def of(system: str) -> tuple[list[Reply], list[dict]]:
            return ([r for r in replies if r.system == system and r.concurrency == n],
                    [rd for rd in rounds if rd["system"] == system and rd["concurrency"] == n])

        for system in [*ours, *peers_]:
            rows.append({"system": system, "concurrency": n, **system_stats(*of(system))})
        for system in ours:
            for peer in [*peers_, *(p for p in ours[:1] if p != system)]:
                (mine, my_rounds), (theirs, their_rounds) = of(system), of(peer)
                ratios.append({"system": system, "peer": peer, "concurrency": n,
                               **compare(mine, theirs, my_rounds, their_rounds)})
            if n == 1 and peers_:
                greedy[system] = greedy_matches(of(system)[0], of(peers_[0])[0])
        for kind in sorted(set(kinds)) if len(set(kinds)) > 1 else []:
            def of_kind(system: str) -> list[Reply]:
                return [r for r in of(system)[0] if kinds[r.prompt] == kind and not r.error]

            for system in ours:
                for peer in [*peers_, *(p for p in ours[:1] if p != system)]:
                    ratio = compare(of_kind(system), of_kind(peer), [], [])
                    by_kind.append({"system": system, "peer": peer, "concurrency": n, "kind": kind,
                                    "tpot_p50_ms": p50(r.tpot_ms for r in of_kind(system) if r.tpot_ms is not None),
                                    "peer_tpot_p50_ms": p50(r.tpot_ms for r in of_kind(peer) if r.tpot_ms is not None),
                                    "tpot_p50": ratio["tpot_p50"], "rate_p50": ratio["rate_p50"]})
    return {"rows": rows, "ratios": ratios, "greedy_matches": greedy, "by_kind": by_kind}


async def conversations(base_url: str, model: str, turns: list[tuple[str, str]], max_tokens: int,
                        system: str) -> list[tuple[Reply, Reply]]:
    """One client: each conversation's first turn, then its second sent after the first answer
    (MT-Bench's order), so the second's prompt begins with the first's prompt and answer."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=0)
    out = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as http:
        for i, (first, second) in enumerate(turns):
            one = await chat(http, base_url, model, first, max_tokens, Reply(system, 1, 0, 0, i))
            messages = [{"role": "user", "content": first}, {"role": "assistant", "content": one.text},
                        {"role": "user", "content": second}]
            two = await chat(http, base_url, model, messages, max_tokens, Reply(system, 1, 1, 0, i))
            out.append((one, two))
    return out


def multi_turn_stats(pairs: list[tuple[Reply, Reply]]) -> dict:
    """Prefix reuse across turns: the share of second-turn prompt tokens served from the cache,
    and the second turns' TTFT against the first turns'."""
    ok = [(a, b) for a, b in pairs if not a.error and not b.error]
    cached = [b.cached_tokens for _, b in ok if b.cached_tokens is not None]
    return {"conversations": len(pairs), "errors": len(pairs) - len(ok),
            "first_prompt_tokens": statistics.mean(a.prompt_tokens for a, _ in ok) if ok else math.nan,
            "second_prompt_tokens": statistics.mean(b.prompt_tokens for _, b in ok) if ok else math.nan,
            "second_hit_rate": sum(cached) / sum(b.prompt_tokens for _, b in ok) if cached and ok else None,
            "first_ttft_p50_ms": p50(a.ttft_ms for a, _ in ok), "second_ttft_p50_ms": p50(b.ttft_ms for _, b in ok),
            "second_over_first_ttft": ratio_ci([b.ttft_ms for _, b in ok], [a.ttft_ms for a, _ in ok], stat=p50,
                                               lower_is_better=True) if len(ok) >= 2 else None}


def run_part(cfg) -> dict:
    """Start our stack and every peer, run the rounds with the systems alternated, the two-turn
    conversations, and summarise (`cfg`: the runtime benchmark's RuntimeBenchConfig)."""
    from bench.system import draft_counts, now_id, served_model, set_policy
    from specserve.launcher import Stack

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    prompts = workload(cfg.serve_workload)
    batch = max(cfg.concurrency)
    ours = [f"specserve-{p}" for p in cfg.serve_policies]
    binary = peers.find_llama_server()
    out: dict = {"peer_binary": str(binary) if binary else None, "batch_limit": batch, "rounds": cfg.serve_rounds,
                 "max_tokens": cfg.serve_max_tokens, "servers": "all up for the whole part, alternated by round",
                 "workload": cfg.serve_workload, "proposer": cfg.serve_proposer, "prompts": prompts}
    if binary is None:
        out["skipped"] = "no llama-server built for this CPU (make peers): the peers are skipped"
    env = {"SPECSERVE_RUNTIME": "llama.cpp", "SPECSERVE_THREADS": str(cfg.threads),
           "SPECSERVE_MAX_BATCH_SIZE": str(batch)}
    if cfg.serve_proposer:
        env["SPECSERVE_PROPOSER"] = cfg.serve_proposer
    client = redis.Redis.from_url(cfg.redis_url)
    replies: list[Reply] = []
    rounds: list[dict] = []
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "serve-steps.jsonl").write_text("")
    variants = list(cfg.serve_peers) if binary else []
    out["started"] = "the peers first" if cfg.serve_peers_first else "our stack first"
    with ExitStack() as running:
        def start_peers() -> dict:
            return {variant: (running.enter_context(peers.llama_server(  # serves its one model under any name
                binary, variant, cfg.target, cfg.draft, batch, cfg.threads, cfg.out / f"serve-{variant}.log")), "peer")
                for variant in variants}

        # Which process starts first can weigh on its decode speed; the order is the caller's.
        started = start_peers() if cfg.serve_peers_first else {}
        stack = Stack(cfg.target, cfg.draft, cfg.redis_url, extra_env=env).start()
        running.callback(stack.stop)
        urls = {system: (stack.http_address, served_model(stack.http_address)) for system in ours}
        urls.update(started if cfg.serve_peers_first else start_peers())
        for url, model in set(urls.values()):  # first requests pay for lazy set-up; not measured
            asyncio.run(closed_loop(url, model, [WARM_UP], 1, 8, "warm-up", -1))
        systems, policy = list(urls), None
        read: set[tuple[tuple[str, str], int]] = set()  # (server, prompt) pairs sent so far
        out["drafts"] = []
        for n in cfg.concurrency:
            for r in range(cfg.serve_rounds):
                for system in systems[r % len(systems):] + systems[: r % len(systems)]:
                    if system in ours and system != policy:
                        set_policy(client, system.removeprefix("specserve-"))
                        time.sleep(cfg.settle_s)  # the gateway reads the ops keys every second
                        policy = system
                    since = now_id()
                    got, wall = asyncio.run(closed_loop(*urls[system], prompts, n, cfg.serve_max_tokens, system, r))
                    if system in ours:
                        steps = steps_since(client, since)
                        out["drafts"].append({"system": system, "load": n, "rep": r, "duration_s": wall,
                                              **draft_counts(steps)})
                        with (cfg.out / "serve-steps.jsonl").open("a") as f:  # every step record, to look into
                            f.writelines(json.dumps({"system": system, "concurrency": n, "round": r, **rec}) + "\n"
                                         for rec in steps)
                    for reply in got:
                        reply.first_read = (urls[system], reply.prompt) not in read
                        read.add((urls[system], reply.prompt))
                    replies += got
                    rounds.append({"system": system, "concurrency": n, "round": r, "wall_s": wall,
                                   "output_tokens": sum(x.output_tokens for x in got if not x.error)})
        if cfg.serve_conversations:
            # Prefix caching across turns: our first policy and the plain peer, one client each.
            turns = prompt_sets.mt_bench_turns()[: cfg.serve_conversations]
            set_policy(client, ours[0].removeprefix("specserve-"))
            time.sleep(cfg.settle_s)
            out["multi_turn"] = {s: multi_turn_stats(asyncio.run(conversations(*urls[s], turns,
                                                                                cfg.serve_max_tokens, s)))
                                 for s in (ours[0], PEER) if s in urls}
    kinds = tuple(kind for kind in ("fresh", "edits") for _ in workload(kind)) if cfg.serve_workload == "all" else ()
    out.update(summarise(replies, rounds, ours, variants, cfg.concurrency, kinds))
    out["round_times"] = rounds
    out["replies"] = [{**asdict(r), "tpot_ms": r.tpot_ms} for r in replies]
    return out


def steps_since(client: redis.Redis, since: str) -> list[dict]:
    """The gateway's step records since a stream id, once they have all arrived: it sends them
    every FLUSH_EVERY_S, so they are read again until a wait of two sends brings none."""
    from bench.system import step_records

    seen = None
    while True:
        records = [rec for _, rec in step_records(client, since)]
        if len(records) == seen:
            return records
        seen = len(records)
        time.sleep(2 * FLUSH_EVERY_S)


def markdown(s: dict, machine: dict, threads: int) -> list[str]:
    lines = ["", "## Serving: our stack vs llama-server (chat, greedy, streamed, closed loop)", "",
             f"CPU flags {' '.join(machine['cpu_flags'])}; {threads} threads each; batch limit {s['batch_limit']} "
             f"(our max batch size, llama-server `-np`); {s['rounds']} rounds of the 8 prompts per client, "
             f"{s['max_tokens']} tokens at most; {s['servers']}, {s.get('started', 'our stack first')} started."]
    if s.get("skipped"):
        lines += ["", f"Peer skipped: {s['skipped']}."]
    lines += ["", "| system | concurrent | output tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | "
                  "prompt tokens | cached prompt tokens | errors |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in s["rows"]:
        cached = f"{row['cached_tokens_mean']:.0f}" if row["cached_tokens_mean"] is not None else "-"
        lines.append(f"| {row['system']} | {row['concurrency']} | {row['tokens_per_s']:.2f} | {row['ttft_p50_ms']:.0f} | "
                     f"{row['ttft_p99_ms']:.0f} | {row['tpot_p50_ms']:.1f} | {row['prompt_tokens_mean']:.0f} | {cached} | "
                     f"{row['errors']}/{row['requests']} |")
    if s["ratios"]:
        lines += ["", "Ours / peer (95% CI): above 1 is ours faster for tokens/s, ours slower for the times. "
                      "TTFTs are paired only where both requests found their prompt alike (both the first to "
                      "reach their server, or both after it).",
                  "", "| system | peer | concurrent | tokens/s | TTFT p50 | TTFT p99 | TPOT p50 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in s["ratios"]:
            cells = " | ".join(_ci(row[k]) for k in ("tokens_per_s", "ttft_p50", "ttft_p99", "tpot_p50"))
            lines.append(f"| {row['system']} | {row['peer']} | {row['concurrency']} | {cells} |")
    if s.get("by_kind"):
        lines += ["", "By kind of prompt (fresh generations; code edits, whose answer copies most of the prompt), "
                      "ours / peer (95% CI): TPOT p50, and the p50 of each request's own tokens/s (its output "
                      "tokens over its whole time, first token included; paired where both found their prompt "
                      "alike, as the TTFTs):", "",
                  "| system | peer | concurrent | kind | TPOT ours ms | TPOT peer ms | TPOT ratio | tokens/s ratio |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in s["by_kind"]:
            lines.append(f"| {row['system']} | {row['peer']} | {row['concurrency']} | {row['kind']} | "
                         f"{row['tpot_p50_ms']:.1f} | {row['peer_tpot_p50_ms']:.1f} | {_ci(row['tpot_p50'])} | "
                         f"{_ci(row['rate_p50'])} |")
    lines += ["", *acceptance_table(Pooled({"runs": s.get("drafts", [])}), load_name="number of clients")]
    for system, g in s["greedy_matches"].items():
        lines += ["", f"Greedy text at 1 client, first round: {system} matches llama-server on {g['matching']} of "
                      f"{g['compared']} prompts both answered ({len(s['prompts'])} sent)."]
    if s.get("multi_turn"):
        lines += ["", "Two-turn conversations (MT-Bench, the second turn sent after the first answer, one client):", "",
                  "| system | conversations | turn-1 prompt | turn-2 prompt | turn-2 cached share | turn-1 TTFT p50 ms | "
                  "turn-2 TTFT p50 ms | turn 2 / turn 1 TTFT p50 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for system, m in s["multi_turn"].items():
            hit = f"{m['second_hit_rate']:.1%}" if m["second_hit_rate"] is not None else "-"
            ratio = _ci(m["second_over_first_ttft"]) if m["second_over_first_ttft"] else "-"
            lines.append(f"| {system} | {m['conversations'] - m['errors']} | {m['first_prompt_tokens']:.0f} | "
                         f"{m['second_prompt_tokens']:.0f} | {hit} | {m['first_ttft_p50_ms']:.0f} | "
                         f"{m['second_ttft_p50_ms']:.0f} | {ratio} |")
    return lines


def _ci(c: dict) -> str:
    return f"{c['ratio']:.3f} ({c['low']:.3f}-{c['high']:.3f})"
