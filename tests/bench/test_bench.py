"""The benchmark's replay logic and report builder on a small synthetic trace, and a smoke run of
the whole bench on the tiny pair."""

import json
from pathlib import Path

import pytest

from bench.replay import fit_prompt, plan, read_trace, window
from bench.report import markdown, targets


def _trace(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{t},{c},{g}\n" for t, c, g in rows))
    return path


SYNTH = [(f"2023-11-16 18:17:0{i}.{i}000000", 1000 * (i + 1), 10 * (i + 1)) for i in range(6)]


def test_read_and_window_keep_the_arrival_pattern(tmp_path):
    rows = read_trace(_trace(tmp_path / "t.csv", SYNTH))
    assert [round(r.t, 3) for r in rows] == [0.0, 1.1, 2.2, 3.3, 4.4, 5.5]
    cut = window(rows, 2, 3)
    assert [round(r.t, 3) for r in cut] == [0.0, 1.1, 2.2] and cut[0].context == 3000


def test_plan_scales_time_to_the_rate_and_lengths_with_caps(tmp_path):
    rows = window(read_trace(_trace(tmp_path / "t.csv", SYNTH)), 0, 6)
    planned = plan(rows, rate=2.0, context_scale=0.1, output_scale=0.5, max_context=450, max_output=20)
    # 5 gaps over 5.5 s is 0.909 req/s naturally; at 2 req/s the same pattern spans 2.5 s.
    assert planned[-1].at == pytest.approx(2.5)
    assert [p.prompt_tokens for p in planned] == [100, 200, 300, 400, 450, 450]
    assert [p.max_new_tokens for p in planned] == [5, 10, 15, 20, 20, 20]


def test_fit_prompt_cuts_or_repeats():
    assert fit_prompt([1, 2, 3], 2) == [1, 2]
    assert fit_prompt([1, 2, 3], 7) == [1, 2, 3, 1, 2, 3, 1]


def _run(level, policy, tpot, attain):
    return {"level": level, "policy": policy, "requests": 4, "completed": 4, "rejected": 0,
            "ttft_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0}, "tpot_ms": {"p50": tpot, "p90": 2.0, "p99": 3.0},
            "slo_attainment": attain, "goodput_rps": 1.0, "goodput_tokens_per_s": 1.0, "tokens_per_s": 1.0,
            "mean_accepted_length": 2.0, "acceptance_by_position": [0.8, 0.5], "controller_ms_per_step": 0.1,
            "duration_s": 1.0}


def test_report_checks_targets_as_ratios(tmp_path):
    # TPOT p50 in ms: lower is faster.
    runs = [_run(1.0, "off", 100.0, 0.5), _run(1.0, "static:1", 90.0, 0.6), _run(1.0, "static:3", 70.0, 0.7),
            _run(1.0, "adaptive", 71.0, 0.7)]
    checks = {what.rsplit(" (", 1)[0]: ok for what, _, ok in targets(runs, {"split_cost_fraction": 0.02})}
    assert checks["load 1.0: speed vs best static k >= 0.97"]
    assert checks["load 1.0: speed vs worst static k >= 1.1"]
    assert checks["load 1.0: adaptive SLO attainment >= every other policy"]
    assert checks["load 1.0 (highest): speed vs off >= 0.97"]
    assert checks["service split costs <= 5% of step time"]
    runs[-1]["tpot_ms"]["p50"] = 80.0
    assert not {w.rsplit(" (", 1)[0]: ok for w, _, ok in targets(runs, None)}["load 1.0: speed vs best static k >= 0.97"]
    text = markdown({"runs": runs, "baseline": {}, "config": {}})
    assert "| adaptive |" in text and "## Targets" in text


def test_smoke_run_of_the_whole_bench_on_tiny_models(tiny_dir, redis_url, tmp_path):
    from bench import system

    code = _trace(tmp_path / "code.csv", SYNTH)
    chat = _trace(tmp_path / "chat.csv", SYNTH)
    cfg = system.BenchConfig(str(tiny_dir[0]), str(tiny_dir[1]), {"code": code, "chat": chat}, redis_url,
                             tmp_path / "out", load_factors=(0.8,), requests_per_level=4, context_tokens=24,
                             max_context_tokens=48, output_tokens=6, max_output_tokens=8, window_start=0,
                             hf_prompts=1, settle_s=1.1, max_batch_size=4)
    report = system.run(cfg)
    assert {r["policy"] for r in report["runs"]} == set(system.POLICIES)
    assert all(r["completed"] + r["rejected"] == r["requests"] == 4 for r in report["runs"])
    saved = json.loads((tmp_path / "out" / "system.json").read_text())
    assert len(saved["requests"]) == 4 * len(system.POLICIES)
    for name in ("system.md", "attainment.png", "tpot_p99.png", "speedup_vs_k.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_ratio_interval_calls_a_tie_a_tie():
    from bench.stats import ratio_ci

    clear = ratio_ci([2.0, 2.1, 1.9, 2.05] * 5, [1.0, 1.02, 0.98, 1.01] * 5)
    assert clear["verdict"] == "win" and clear["low"] > 1.8
    noisy = ratio_ci([1.0, 1.5, 0.6, 1.2, 0.8], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert noisy["verdict"] == "tie" and noisy["low"] < 1 < noisy["high"]


def test_smoke_run_of_the_runtime_bench_on_tiny_models(tiny_dir, redis_url, tmp_path):
    from bench import runtime

    cfg = runtime.RuntimeBenchConfig(str(tiny_dir[0]), str(tiny_dir[1]), redis_url, tmp_path / "out", threads=1,
                                     positions=(1, 2), sessions=(1, 2), contexts=(20,), repeats=1, decode_tokens=4,
                                     decode_rounds=1, prompts_per_set=2, new_tokens=4, concurrency=(1, 2),
                                     policies=("off", "adaptive"), settle_s=1.1, http_rounds=1)
    report = runtime.run(cfg)
    costs = [c for c in report["costs"] if "positions" in c]
    assert {c["runtime"] for c in costs} == {"torch", "llama.cpp"} and len(costs) == 2 * 2 * 2
    assert 0 <= next(c for c in report["costs"] if "outside_forward_share" in c)["outside_forward_share"] < 1
    assert [d["concurrency"] for d in report["decode"]] == [1, 2] and all(d["ratio"] > 0 for d in report["decode"])
    assert {(p["prompt_set"], p["concurrency"], p["policy"]) for p in report["policies"]} == {
        (s, n, p) for s in ("humaneval", "mt-bench") for n in (1, 2) for p in ("off", "adaptive")}
    assert [h["concurrency"] for h in report["http"]] == [1, 2] and all(h["ratio"] > 0 for h in report["http"])
    assert "## Cost of one forward" in (tmp_path / "out" / "runtime.md").read_text()
