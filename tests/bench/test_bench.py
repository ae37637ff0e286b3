"""The benchmark's replay logic and report builder on a small synthetic trace, and a smoke run of
the whole bench on the tiny pair."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.replay import arrivals, fit_prompt, read_trace, window
from specserve.launcher import HUGE_PAGES


def _trace(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{t},{c},{g}\n" for t, c, g in rows))
    return path


SYNTH = [(f"2023-11-16 18:17:0{i}.{i}000000", 1000 * (i + 1), 10 * (i + 1)) for i in range(6)]


def test_read_and_window_keep_the_arrival_pattern(tmp_path):
    rows = read_trace(_trace(tmp_path / "t.csv", SYNTH))
    assert [round(r.t, 3) for r in rows] == [0.0, 1.1, 2.2, 3.3, 4.4, 5.5]
    cut = window(rows, 2, 3)
    assert [round(r.t, 3) for r in cut] == [0.0, 1.1, 2.2] and cut[0].context == 3000


def test_arrivals_keep_the_pattern_time_scaled_to_the_rate(tmp_path):
    rows = window(read_trace(_trace(tmp_path / "t.csv", SYNTH)), 1, 5)
    # 4 gaps over 4.4 s is 0.909 req/s naturally; at 2 req/s the same pattern spans 2 s.
    assert arrivals(rows, 2.0) == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert arrivals(rows, float("inf")) == pytest.approx([0.0, 1.1, 2.2, 3.3, 4.4])


def test_fit_prompt_cuts_or_repeats():
    assert fit_prompt([1, 2, 3], 2) == [1, 2]
    assert fit_prompt([1, 2, 3], 7) == [1, 2, 3, 1, 2, 3, 1]


def _request(system, index, tokens, met, tpot, rep=0, load=1):
    return {"system": system, "load": load, "rep": rep, "klass": "code", "index": index, "status": 200,
            "output_tokens": tokens, "ttft_ms": 10.0, "tpot_ms": tpot, "slo_met": met}


def _report(per_system: dict[str, tuple[list[bool], float]]) -> dict:
    """Two repetitions of 20 requests of 10 tokens per system at load 1; (which met the SLO, TPOT)."""
    runs, reqs = [], []
    for system, (met, tpot) in per_system.items():
        for rep in (0, 1):
            runs.append({"system": system, "load": 1, "rep": rep, "duration_s": 10.0, "refused": 0})
            reqs += [_request(system, i, 10, m, tpot + i % 3, rep) for i, m in enumerate(met)]
    return {"runs": runs, "requests": reqs, "config": {"policies": ["off", "static:2", "adaptive"]}}


def test_report_pools_repetitions_and_calls_ties_and_wins():
    from bench.report import Pooled, summary

    report = _report({"off": ([True] * 10 + [False] * 10, 50.0), "static:2": ([True] * 12 + [False] * 8, 40.0),
                      "adaptive": ([True] * 20, 30.0), "llama-server": ([True] * 8 + [False] * 12, 55.0),
                      "llama-server-draft": ([True] * 19 + [False], 45.0),
                      "llama-server-ngram-mod": ([True] * 15 + [False] * 5, 40.0)})
    pooled = Pooled(report)
    # 2 reps x 20 met requests x 10 tokens over 2 x 10 s.
    assert pooled.goodput("adaptive", 1) == pytest.approx(20.0)
    assert pooled.goodput("off", 1) == pytest.approx(10.0)
    assert pooled.best(1, ["off", "static:2", "adaptive"]) == "adaptive"
    assert pooled.goodput_ratio("adaptive", "off", 1)["verdict"] == "win"
    assert pooled.speedup("adaptive", "off", 1)["ratio"] == pytest.approx(51 / 31, rel=0.02)
    lines, checks = summary(pooled)
    assert len(lines) == 1 and "`off` / `llama-server` goodput 1.250" in lines[0]
    assert "`adaptive` / `llama-server-draft` (the best speculating peer here)" in lines[0]
    assert len(checks) == 5 and all(ok for _, _, ok in checks), checks
    worse = _report({"off": ([True] * 10 + [False] * 10, 30.0), "adaptive": ([True] * 5 + [False] * 15, 50.0),
                     "llama-server": ([True] * 20, 30.0), "llama-server-ngram-mod": ([True] * 20, 20.0)})
    for run in worse["runs"]:
        run["refused"] = 1
    _, checks = summary(Pooled(worse))
    assert len(checks) == 5 and not any(ok for _, _, ok in checks), checks


def test_report_markdown_and_plots(tmp_path):
    from bench.report import markdown, write_report

    report = _report({"off": ([True] * 20, 50.0), "adaptive": ([True] * 20, 49.0)})
    report["ramp"] = {"schedule": [(0, 1), (1, 0)], "policies": {"adaptive": {
        "series": [{"t": 0.1 * i, "batch": 1, "k": i % 2, "tpot_ms": 10.0, "mode": "adaptive"} for i in range(6)],
        "switches": [{"t": 0.1, "to": "on", "batch": 1, "ratio": 1.0, "stall": False}], "requests": 3, "completed": 3}}}
    text = markdown(report)
    assert "## Summary" in text and "| adaptive |" in text and "`adaptive` / `off` goodput" in text
    assert "| ramp, adaptive: no switching step over 1.5x the steps of the state it switched to | 1 switches (1 with steps of their state at their batch size), worst 1.00x | yes |" in text
    write_report(report, tmp_path)
    for name in ("system.md", "goodput_vs_load.png", "tpot_cdf.png", "ramp.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_ramp_schedule_and_the_stall_check():
    from bench.ramp import step_series, switch_stalls, triangle, worst_switch

    assert [c for _, c in triangle(3, 2.0)] == [1, 2, 3, 2, 1, 0] and triangle(3, 2.0)[-1][0] == 10.0

    def rec(batch, drafts, accepted, step_ms, forwards=1):
        return {"batch_size": batch, "verified_positions": batch * forwards + drafts, "accepted": accepted,
                "step_ms": step_ms, "drafted": [drafts // batch] * batch, "forwards": forwards}

    # Plain steps at 100 ms, then speculation: 2 drafts per session, 1 accepted -> 2 tokens per step.
    steps = [rec(2, 0, [0, 0], 100.0)] * 4 + [rec(2, 4, [1, 1], 180.0)] * 4
    series = step_series([(10.0 + i, r) for i, r in enumerate(steps)])
    assert series[0]["t"] == 0.0 and series[4]["k"] == 2.0 and series[4]["tpot_ms"] == pytest.approx(90.0)
    switches = switch_stalls(series)
    assert [(s["to"], s["stall"]) for s in switches] == [("on", False)]
    # The drafter catching up on the plain stretch makes the first drafting step 400 ms: a stall.
    stalled = steps[:4] + [rec(2, 4, [1, 1], 400.0)] + steps[5:]
    assert switch_stalls(step_series([(float(i), r) for i, r in enumerate(stalled)]))[0]["stall"]
    # A switch to plain decoding, and a first draft all rejected (one token for a drafting step's
    # time), cost what their states cost: no stall, although each token took longer than its
    # speculating neighbours'.
    back = steps[4:] + [rec(2, 0, [0, 0], 100.0)] + steps[:3] + [rec(2, 4, [0, 0], 185.0)] + steps[4:]
    switches = switch_stalls(step_series([(float(i), r) for i, r in enumerate(back)]))
    assert [(s["to"], s["stall"]) for s in switches] == [("off", False), ("on", False)]
    assert switches[0]["ratio"] == pytest.approx(1.0) and switches[1]["ratio"] == pytest.approx(185 / 180)
    # A decode burst (4 plain forwards in one call, 400 ms) is plain decoding at 100 ms a token.
    burst = step_series([(0.0, rec(2, 0, [0, 0], 400.0, forwards=4))])[0]
    assert burst["k"] == 0.0 and burst["tpot_ms"] == pytest.approx(100.0) and burst["step_ms"] == pytest.approx(100.0)
    # A step reading a prompt (no drafts, a slow forward) between speculating steps is neither a
    # switch nor a stall.
    prompt = {**rec(2, 0, [0, 0], 900.0), "prompt_tokens": 200}
    prompt["verified_positions"] += 200
    spec = [rec(2, 4, [1, 1], 180.0)] * 4
    assert switch_stalls(step_series([(float(i), r) for i, r in enumerate(spec + [prompt] + spec)])) == []
    # The only plain step at batch 4 (twice a batch-1 plain step's time, as a batch of 4 costs) has no
    # reference: steps of another batch size are none, so it is neither a ratio nor a stall.
    mixed = [rec(1, 0, [0], 60.0)] * 4 + [rec(4, 8, [1] * 4, 300.0)] * 4 + [rec(4, 0, [0] * 4, 120.0)] \
        + [rec(4, 8, [1] * 4, 300.0)] * 4
    switches = switch_stalls(step_series([(float(i), r) for i, r in enumerate(mixed)]))
    assert [(s["to"], s["ratio"], s["stall"]) for s in switches][1] == ("off", None, False)
    assert worst_switch(switches) == (2, pytest.approx(1.0))


def test_llama_server_command_for_each_peer(tiny_dir, tmp_path):
    from bench.peers import VARIANTS, command

    binary = tmp_path / "llama-server"
    cmds = {v: command(binary, v, str(tiny_dir[0]), str(tiny_dir[1]), 4, 2, 8080) for v in VARIANTS}
    for cmd in cmds.values():
        assert cmd[cmd.index("-np") + 1] == "4" and cmd[cmd.index("-t") + 1] == "2"
        assert cmd[cmd.index("-m") + 1] == str(tiny_dir[0] / "model.gguf")
    assert "-md" not in cmds["llama-server"] and "--spec-type" not in cmds["llama-server"]
    assert cmds["llama-server-draft"][cmds["llama-server-draft"].index("-md") + 1] == str(tiny_dir[1] / "model.gguf")
    assert cmds["llama-server-ngram"][cmds["llama-server-ngram"].index("--spec-type") + 1] == "ngram-simple"


def _cli_config(which: str, argv: list[str], tiny_dir, redis_url: str, **sizes):
    """A benchmark's config as its command line builds it, shrunk to the tiny pair's sizes."""
    from bench import cli

    args = cli.build_parser().parse_args([which, *argv])
    build = cli.runtime_config if which == "runtime" else cli.system_config
    return dataclasses.replace(build(args, str(tiny_dir[0]), str(tiny_dir[1]), redis_url), **sizes)


def test_every_bench_variant_parses_and_builds_its_config(tmp_path, tiny_dir):
    from bench import cli, runtime, system

    for name in cli.TRACE_FILES.values():
        _trace(tmp_path / name, SYNTH)
    quick = _cli_config("system", ["--traces", str(tmp_path), "--quick"], tiny_dir, "redis://x")
    assert isinstance(quick, system.BenchConfig) and quick.loads == (4,) and quick.reps == 1
    chosen = _cli_config("system", ["--traces", str(tmp_path), "--loads", "1,2", "--policies", "off,static:2",
                                    "--peers", "", "--unused-drafter-pairs", "24"], tiny_dir, "redis://x")
    assert chosen.loads == (1, 2) and chosen.policies == ("off", "static:2") and chosen.peers == ()
    assert chosen.unused_drafter_pairs == 24 and quick.unused_drafter_pairs == 4
    with pytest.raises(SystemExit, match="--unused-drafter-pairs: must be >= 0"):
        _cli_config("system", ["--traces", str(tmp_path), "--unused-drafter-pairs", "-1"], tiny_dir, "redis://x")
    parts = _cli_config("runtime", ["--quick", "--parts", "costs"], tiny_dir, "redis://x")
    assert isinstance(parts, runtime.RuntimeBenchConfig) and parts.parts == ("costs",)
    served = _cli_config("runtime", ["--parts", "serve"], tiny_dir, "redis://x")
    assert served.parts == ("serve",) and served.serve_rounds == 3 and served.serve_max_tokens == 96
    assert _cli_config("runtime", ["--parts", "bursts", "--rounds", "2"], tiny_dir, "redis://x").bursts_rounds == 2
    assert served.concurrency == (1, 4) and served.threads == 2 and served.serve_policies == ("off", "adaptive")
    assert not served.serve_peers_first
    assert _cli_config("runtime", ["--parts", "serve", "--peers-first"], tiny_dir, "redis://x").serve_peers_first
    assert "serve" in runtime.RuntimeBenchConfig("t", "d", "r", tmp_path).parts
    with pytest.raises(SystemExit, match="--parts: unknown nonsense"):
        _cli_config("runtime", ["--parts", "serve,nonsense"], tiny_dir, "redis://x")
    for bad in (["--policies", "nonsense"], ["--peers", "vllm"]):
        with pytest.raises(SystemExit, match="unknown"):
            _cli_config("system", ["--traces", str(tmp_path), *bad], tiny_dir, "redis://x")
    with pytest.raises(SystemExit, match="--traces"):
        _cli_config("system", [], tiny_dir, "redis://x")
    help_text = subprocess.run([sys.executable, "-m", "specserve.cli", "bench", "--help"], capture_output=True,
                               text=True, timeout=60)
    assert help_text.returncode == 0 and "--traces" in help_text.stdout


@pytest.mark.processes
def test_smoke_run_of_the_whole_bench_on_tiny_models(tiny_dir, redis_url, tmp_path):
    from bench import cli, peers

    for name in cli.TRACE_FILES.values():
        _trace(tmp_path / name, SYNTH)
    # The peers run where `make peers` has built llama-server for this CPU (not part of `make test`).
    with_peers = ("llama-server-draft",) if peers.find_llama_server() else ()
    cfg = _cli_config("system", ["--traces", str(tmp_path), "--out", str(tmp_path / "out"), "--loads", "2",
                                 "--policies", "off,adaptive", "--peers", ",".join(with_peers)], tiny_dir, redis_url,
                      requests=4, reps=1, max_context_tokens=48, max_output_tokens=8, window_start=0, threads=1,
                      max_batch_size=4, ramp_policies=("adaptive",),
                      ramp_peak=2, ramp_hold_s=1.0, unused_drafter_pairs=2, torch_requests=1, settle_s=1.1)
    cli.run("system", cfg)
    report = json.loads((tmp_path / "out" / "system.json").read_text())
    assert [(r["system"], r["requests"]) for r in report["runs"]] == [(s, 4) for s in ("off", "adaptive", *with_peers)]
    assert all(r["completed"] + r["refused"] == 4 for r in report["runs"])
    # Real tasks at their data's lengths, within the caps: prompts up to 48 tokens, answers 4 to 8.
    assert all(q["prompt_tokens"] <= 48 and 4 <= q["max_tokens"] <= 8 for q in report["requests"])
    assert {q["klass"] for q in report["requests"]} == {"code", "chat"}
    assert len(json.loads((tmp_path / "out" / "system.partial.json").read_text())["runs"]) == len(report["runs"])
    assert report["ramp"]["policies"]["adaptive"]["series"] and report["unused_drafter"]["total_ms"]["n"] == 2
    assert set(report["torch"]["stack"]) == {"off@1", "off@4", "adaptive@1", "adaptive@4"}
    assert set(report["torch"]["hf"]) == {"plain", "assisted"}
    saved = json.loads((tmp_path / "out" / "system.json").read_text())
    assert len(saved["requests"]) == 4 * len(report["runs"])
    for name in ("system.md", "goodput_vs_load.png", "tpot_cdf.png", "ramp.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_ratio_interval_calls_a_tie_a_tie():
    from bench.stats import ratio_ci

    twice, once = [2.0, 2.1, 1.9, 2.05] * 5, [1.0, 1.02, 0.98, 1.01] * 5
    clear = ratio_ci(twice, once)
    assert clear["verdict"] == "win" and clear["low"] > 1.8
    noisy = ratio_ci([1.0, 1.5, 0.6, 1.2, 0.8], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert noisy["verdict"] == "tie" and noisy["low"] < 1 < noisy["high"]
    # Times: ours twice the peer's is a loss, half of it a win.
    assert ratio_ci(twice, once, lower_is_better=True)["verdict"] == "loss"
    assert ratio_ci(once, twice, lower_is_better=True)["verdict"] == "win"


@pytest.mark.processes
def test_smoke_run_of_the_runtime_bench_on_tiny_models(tiny_dir, redis_url, tmp_path):
    from bench import cli

    cfg = _cli_config("runtime", ["--out", str(tmp_path / "out"), "--parts", "costs,decode,policies,http,bursts,pages,saves"],
                      tiny_dir, redis_url, threads=1,
                      positions=(1, 2), sessions=(1, 2), contexts=(20,), repeats=1, decode_tokens=4,
                      decode_rounds=1, prompts_per_set=2, new_tokens=4, concurrency=(1, 2),
                      policies=("off", "adaptive"), settle_s=1.1, http_rounds=1, pages_rounds=2, pages_tokens=4,
                      saves_rounds=2, saves_prompt_tokens=12, saves_decode_steps=2, burst_steps=(1, 4),
                      bursts_rounds=2, serve_max_tokens=6)
    assert "## Cost of one forward" in cli.run("runtime", cfg)
    report = json.loads((tmp_path / "out" / "runtime.json").read_text())
    costs = [c for c in report["costs"] if "positions" in c]
    assert {c["runtime"] for c in costs} == {"torch", "llama.cpp"} and len(costs) == 2 * 2 * 2
    assert 0 <= next(c for c in report["costs"] if "outside_forward_share" in c)["outside_forward_share"] < 1
    assert [d["concurrency"] for d in report["decode"]] == [1, 2] and all(d["ratio"] > 0 for d in report["decode"])
    assert {(p["prompt_set"], p["concurrency"], p["policy"]) for p in report["policies"]} == {
        (s, n, p) for s in ("humaneval", "mt-bench") for n in (1, 2) for p in ("off", "adaptive")}
    # Each policy read every prompt in full (its own first line keeps the other's KV from serving it),
    # and its first tokens are compared with off's on the same prompts.
    policy = [s for s in report["samples"] if s["part"] == "policy"]
    assert len(policy) == 2 * 2 * 2 * 2 and max(s["cached_share"] for s in policy) < 0.9
    assert all(p["ttft"]["n"] == 2 and p["ttft_ms"] > 0 for p in report["policies"])
    assert [h["concurrency"] for h in report["http"]] == [1, 2] and all(h["ratio"] > 0 for h in report["http"])
    # both burst lengths ran the serving prompts in every round, paired per request
    assert [(b["concurrency"], b["short"], b["long"]) for b in report["bursts"]] == [(1, 1, 4), (2, 1, 4)]
    assert all(b["n"] > 0 and b["ratio"] > 0 for b in report["bursts"])
    bursts = [s for s in report["samples"] if s["part"].startswith("bursts-")]
    assert {s["part"] for s in bursts} == {"bursts-1", "bursts-4"} and all(s["tpot_ms"] > 0 for s in bursts)
    # each page size ran in processes of its own, under its own tunable
    pages = report["pages"]
    assert pages["tunables"] == {"huge pages": HUGE_PAGES["GLIBC_TUNABLES"], "4 KB pages": ""}
    assert [len(v) for v in pages["ms_per_token"].values()] == [2, 2] and pages["ratio"] > 0
    # every released session was saved, into each ring in turn
    saves = report["saves"]
    assert [len(v) for v in saves["ms"].values()] == [2 * 4, 2 * 4] and saves["bytes"] > 0 and saves["ratio"] > 0
    md = (tmp_path / "out" / "runtime.md").read_text()
    assert "## Cost of one forward" in md and "## Huge pages" in md and "## Prefix cache: saving" in md
    assert "## Decode bursts of up to 4 forwards per verify call against 1" in md


def _reply(system, round_, client, prompt, ttft, e2e, tokens, text="x", cached=None, concurrency=1):
    from bench.serve import Reply

    return Reply(system, concurrency, round_, client, prompt, text, tokens, 40, cached, ttft, e2e)


def test_serve_summary_ratios_tpot_and_greedy_matches():
    from bench.serve import markdown, summarise, tpot_ms

    # vLLM's TPOT: (E2E - TTFT) / (output tokens - 1); undefined for one token.
    assert tpot_ms(1100.0, 100.0, 11) == pytest.approx(100.0) and tpot_ms(50.0, 50.0, 1) is None
    # Two rounds of four prompts at one client: ours has half the peer's TTFT and the same TPOT, and
    # finishes each round in half the time; prompt 3's text differs and the peer failed prompt 2 once.
    replies, rounds = [], []
    for r in (0, 1):
        for p in range(4):
            replies.append(_reply("specserve-off", r, 0, p, 50.0 + p, 50.0 + p + 900, 10, text=f"t{p}"))
            replies.append(_reply("llama-server", r, 0, p, 100.0 + 2 * p, 100.0 + 2 * p + 900, 10,
                                  text=f"t{p}" if p != 3 else "other", cached=8))
        rounds += [{"system": "specserve-off", "concurrency": 1, "round": r, "wall_s": 2.0, "output_tokens": 40},
                   {"system": "llama-server", "concurrency": 1, "round": r, "wall_s": 4.0, "output_tokens": 40}]
    replies[5].error = "Server disconnected"  # the peer's prompt 2 in round 0: left out of every pair
    out = summarise(replies, rounds, ["specserve-off"], ["llama-server"], (1,))
    ours, peer = out["rows"]
    assert ours["tokens_per_s"] == pytest.approx(20.0) and peer["tokens_per_s"] == pytest.approx(10.0)
    assert ours["tpot_p50_ms"] == pytest.approx(100.0) and ours["ttft_p50_ms"] == 52.0 and ours["ttft_p99_ms"] == 53.0
    assert ours["cached_tokens_mean"] is None and peer["cached_tokens_mean"] == 8 and peer["errors"] == 1
    ratio = out["ratios"][0]
    assert ratio["tokens_per_s"]["ratio"] == pytest.approx(2.0) and ratio["tokens_per_s"]["n"] == 2
    # Paired: the 7 requests both answered; their medians are 51 and 102 ms, their p99s 53 and 106.
    assert ratio["ttft_p50"]["ratio"] == pytest.approx(0.5) and ratio["ttft_p50"]["n"] == 7
    assert ratio["ttft_p99"]["ratio"] == pytest.approx(0.5) and ratio["tpot_p50"]["ratio"] == pytest.approx(1.0)
    assert out["greedy_matches"] == {"specserve-off": {"matching": 2, "compared": 3}}
    assert out["by_kind"] == []  # one kind of prompt: no split
    # Prompts 0-1 fresh, 2-3 edits: TPOT per kind, paired as above (the failed edit left out).
    by_kind = summarise(replies, rounds, ["specserve-off"], ["llama-server"], (1,), ("fresh", "fresh", "edits", "edits"))
    assert [(b["kind"], b["tpot_p50"]["n"], b["tpot_p50_ms"], b["peer_tpot_p50_ms"]) for b in by_kind["by_kind"]] == \
        [("edits", 3, pytest.approx(100.0), pytest.approx(100.0)), ("fresh", 4, pytest.approx(100.0), pytest.approx(100.0))]
    # Each request's own tokens/s holds its first token: the edits' medians are prompt 3's, 10
    # tokens in 953 ms ours and 1006 ms the peer's.
    edits = by_kind["by_kind"][0]["rate_p50"]
    assert edits["n"] == 3 and edits["ratio"] == pytest.approx(1006 / 953)
    text = "\n".join(markdown({**by_kind, "batch_limit": 4, "rounds": 2, "max_tokens": 96, "servers": "both up",
                                "prompts": ["p"] * 4}, {"cpu_flags": ["avx2"]}, 2))
    assert "| specserve-off | llama-server | 1 | edits | 100.0 | 100.0 | 1.000 (1.000-1.000) | 1.056 (" in text
    text = "\n".join(markdown({**out, "batch_limit": 4, "rounds": 2, "max_tokens": 96, "servers": "both up",
                                "prompts": ["p"] * 4}, {"cpu_flags": ["avx2"]}, 2))
    assert "| specserve-off | 1 | 20.00 | 52 | 53 | 100.0 | 40 | - | 0/8 |" in text
    assert "| specserve-off | llama-server | 1 | 2.000 (2.000-2.000) |" in text
    assert "on 2 of 3 prompts both answered (4 sent)" in text
    # Without the peer: our rows only, and the report says why.
    alone = summarise([r for r in replies if r.system != "llama-server"], rounds[::2], ["specserve-off"], [], (1,))
    assert [row["system"] for row in alone["rows"]] == ["specserve-off"] and alone["ratios"] == []
    text = "\n".join(markdown({**alone, "batch_limit": 4, "rounds": 2, "max_tokens": 96, "servers": "both up",
                                "prompts": [], "skipped": "no llama-server"}, {"cpu_flags": []}, 2))
    assert "Peer skipped: no llama-server." in text and "Ours / peer (95% CI)" not in text


def test_serve_ttfts_are_paired_only_where_both_found_their_prompt_alike():
    from bench.serve import compare

    # Round 0: the peer reads prompt 0 afresh while ours (our second policy) finds it cached: that
    # pair would flatter ours 10x, so only round 1's pair, both cached, times the first token.
    ours = [_reply("specserve-adaptive", 0, 0, 0, 10.0, 1010.0, 11), _reply("specserve-adaptive", 1, 0, 0, 20.0, 1020.0, 11)]
    peer = [_reply("llama-server", 0, 0, 0, 100.0, 1100.0, 11), _reply("llama-server", 1, 0, 0, 20.0, 1020.0, 11)]
    peer[0].first_read = True
    rounds = [{"round": r, "wall_s": 1.0, "output_tokens": 11} for r in (0, 1)]
    ratio = compare(ours, peer, rounds, rounds)
    assert ratio["ttft_p50"]["n"] == 1 and ratio["ttft_p50"]["ratio"] == pytest.approx(1.0)
    assert ratio["tpot_p50"]["n"] == 2  # decoding speed does not depend on the cache
    peer[0].first_read, ours[0].first_read = False, False
    assert compare(ours, peer, rounds, rounds)["ttft_p50"]["n"] == 2


def test_serve_client_times_content_and_counts_from_usage():
    import asyncio

    import httpx

    from bench.serve import Reply, chat, workload

    prompts = workload()
    assert workload("fresh") + workload("edits") == prompts
    assert len(prompts) == 8 and all(p.startswith("Write a Python function") for p in prompts[:4])
    assert all(p.startswith("Rename the variable") and p.count("\n") >= 20 for p in prompts[4:])
    # As llama-server streams: a role chunk without content, content, the finish, then the usage.
    chunks = [{"choices": [{"delta": {"role": "assistant", "content": None}}]},
              {"choices": [{"delta": {"content": "def f"}}]}, {"choices": [{"delta": {"content": "(): pass"}}]},
              {"choices": [{"delta": {}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 20,
                                        "prompt_tokens_details": {"cached_tokens": 12}}}]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert request.url.path == "/v1/chat/completions" and body["messages"] == [{"role": "user", "content": "hi"}]
        assert body["temperature"] == 0 and body["stream_options"] == {"include_usage": True}
        return httpx.Response(200, text=sse)

    async def go() -> Reply:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await chat(http, "http://peer", "m", "hi", 8, Reply("llama-server", 1, 0, 0, 0))

    reply = asyncio.run(go())
    assert (reply.text, reply.output_tokens, reply.prompt_tokens, reply.cached_tokens) == ("def f(): pass", 3, 20, 12)
    assert not reply.error and 0 < reply.ttft_ms <= reply.e2e_ms and reply.tpot_ms is not None


@pytest.mark.processes
def test_smoke_run_of_the_serve_part_on_our_stack_alone(tiny_dir, redis_url, tmp_path, monkeypatch):
    from bench import cli, peers

    monkeypatch.setattr(peers, "find_llama_server", lambda: None)  # the skip path, whether or not it is built
    cfg = _cli_config("runtime", ["--out", str(tmp_path / "out"), "--parts", "serve"], tiny_dir, redis_url,
                      threads=1, concurrency=(1, 2), serve_rounds=2, serve_max_tokens=6, settle_s=1.1,
                      serve_policies=("off", "static:2"), serve_conversations=2)
    text = cli.run("runtime", cfg)
    serve = json.loads((tmp_path / "out" / "runtime.json").read_text())["serve"]
    assert serve["peer_binary"] is None and "make peers" in serve["skipped"] and "Peer skipped" in text
    assert serve["started"] == "our stack first" and "our stack first started" in text
    assert [(row["system"], row["concurrency"], row["requests"]) for row in serve["rows"]] == [
        (system, n, 8 * n * 2) for n in (1, 2) for system in ("specserve-off", "specserve-static:2")]
    assert all(row["errors"] == 0 and row["tokens_per_s"] > 0 for row in serve["rows"])
    # no peer: our second policy against the first only
    assert [(r["system"], r["peer"]) for r in serve["ratios"]] == [("specserve-static:2", "specserve-off")] * 2
    assert serve["greedy_matches"] == {}
    # Each of our rounds with its drafts, from the step telemetry: `off` drafts nothing, `static:2`
    # two tokens a step, every first draft reached.
    drafts = {(d["system"], d["load"], d["rep"]): d for d in serve["drafts"]}
    assert sorted(drafts) == sorted((s, n, r) for s in ("specserve-off", "specserve-static:2") for n in (1, 2)
                                    for r in (0, 1))
    assert all(d["step_ms"] > 0 for d in drafts.values())
    assert all(not d["position_reached"] for (s, _, _), d in drafts.items() if s == "specserve-off")
    static = [d for (s, _, _), d in drafts.items() if s == "specserve-static:2"]
    assert all(len(d["position_reached"]) == 2 and d["position_reached"][0] > 0 for d in static)
    assert "## Acceptance per draft position" in text and "| specserve-static:2 |" in text
    steps = [json.loads(line) for line in (tmp_path / "out" / "serve-steps.jsonl").read_text().splitlines()]
    assert {(s["system"], s["concurrency"], s["round"]) for s in steps} == set(drafts)
    assert sum(sum(s["drafted"]) for s in steps if s["system"] == "specserve-static:2") > 0
    turns = serve["multi_turn"]["specserve-off"]
    assert turns["conversations"] == 2 and turns["errors"] == 0 and turns["second_hit_rate"] > 0
    # At one client (where the part compares greedy texts) each prompt returns the same text every
    # round; batched steps may not, as the tiny random model's logits are near ties.
    texts = {}
    for r in serve["replies"]:
        if r["concurrency"] == 1 and r["system"] == "specserve-off":
            texts.setdefault(r["prompt"], set()).add(r["text"])
    assert len(texts) == 8 and all(len(t) == 1 for t in texts.values())
    assert "## Serving: our stack vs llama-server" in (tmp_path / "out" / "runtime.md").read_text()


def test_multi_turn_stats_report_the_cached_share_and_the_ttft_ratio():
    from bench.prompts import mt_bench_turns
    from bench.serve import multi_turn_stats

    turns = mt_bench_turns()
    assert len(turns) == 80 and all(first and second for first, second in turns)
    pairs = []
    for i in range(4):
        one = _reply("specserve-off", 0, 0, i, 400.0, 1400.0, 10)
        two = _reply("specserve-off", 1, 0, i, 100.0, 1100.0, 10, cached=150)
        one.prompt_tokens, two.prompt_tokens = 100, 200
        pairs.append((one, two))
    stats = multi_turn_stats(pairs)
    assert stats["second_hit_rate"] == pytest.approx(0.75) and stats["first_prompt_tokens"] == 100
    assert stats["second_over_first_ttft"]["ratio"] == pytest.approx(0.25)


def test_report_gives_conditional_acceptance_per_position_and_the_exploring_share(tmp_path):
    from bench.report import Pooled, markdown, write_report

    report = _report({"off": ([True] * 20, 50.0), "adaptive": ([True] * 20, 49.0)})
    for rep, run in enumerate(r for r in report["runs"] if r["system"] == "adaptive"):
        # 10 drafts reached position 1 and 8 were accepted; 8 reached position 2, 2 accepted there.
        # Of those, the suffix drafted 4 that reached position 1 (all accepted) and 4 at position 2 (2 accepted).
        run.update(position_accepted=[8, 2], position_reached=[10, 8], explored_ms=1.0 + rep, step_ms=100.0,
                   free_position_accepted=[4, 2], free_position_reached=[4, 4])
    pooled = Pooled(report)
    assert pooled.conditional_acceptance("adaptive") == [pytest.approx(0.8), pytest.approx(0.25)]
    assert pooled.conditional_acceptance("adaptive", proposer="free") == [pytest.approx(1.0), pytest.approx(0.5)]
    assert pooled.conditional_acceptance("adaptive", proposer="model") == [pytest.approx(4 / 6), pytest.approx(0.0)]
    assert pooled.conditional_acceptance("off") == []
    assert pooled.explored_share("adaptive", 1) == pytest.approx(3.0 / 200.0)
    text = markdown(report)
    table = text.split("## Acceptance")[1].split("##")[0]
    assert "| adaptive | suffix | 1.00 | 0.50 | 1: 1.50% |" in table
    assert "| adaptive | model | 0.67 | 0.00 | 1: 1.50% |" in table and "| off |" not in table
    write_report(report, tmp_path)
    assert (tmp_path / "acceptance.png").stat().st_size > 0
