"""The benchmark report: markdown tables, the targets checked as ratios, and PNG plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def position_sums(rows) -> list[int]:
    """Per draft position, the sum over rows of per-position counts (rows reach different depths)."""
    out: list[int] = []
    for row in rows:
        for j, v in enumerate(row):
            if j == len(out):
                out.append(0)
            out[j] += int(v)
    return out


def _fmt(x, digits=1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def targets(runs: list[dict], split: dict | None) -> list[tuple[str, str, bool]]:
    """The benchmark's targets, each as (what, measured ratio, met). Speed is compared by median
    time per output token (TPOT p50): tokens/s over a replay also depends on how many requests
    admission let in, which differs between policies."""
    out = []
    levels = sorted({r["level"] for r in runs})

    def tpot(run: dict) -> float:
        return run["tpot_ms"]["p50"]

    for level in levels:
        at = {r["policy"]: r for r in runs if r["level"] == level}
        if "adaptive" not in at or not tpot(at["adaptive"]) > 0:
            continue
        ada = tpot(at["adaptive"])
        statics = [tpot(at[p]) for p in at if p.startswith("static:") and tpot(at[p]) > 0]
        if statics:
            best, worst = min(statics), max(statics)
            out.append((f"load {level}: speed vs best static k >= 0.97 (TPOT best static / adaptive)",
                        f"{best / ada:.3f}", best / ada >= 0.97))
            out.append((f"load {level}: speed vs worst static k >= 1.1 (TPOT worst static / adaptive)",
                        f"{worst / ada:.3f}", worst / ada >= 1.1))
        others = [at[p]["slo_attainment"] for p in at if p != "adaptive"]
        if others:
            a = at["adaptive"]["slo_attainment"]
            out.append((f"load {level}: adaptive SLO attainment >= every other policy", f"{a:.2f} vs max {max(others):.2f}",
                        a >= max(others)))
    if levels:
        top = {r["policy"]: r for r in runs if r["level"] == levels[-1]}
        if "adaptive" in top and "off" in top and tpot(top["adaptive"]) > 0:
            ratio = tpot(top["off"]) / tpot(top["adaptive"])
            out.append((f"load {levels[-1]} (highest): speed vs off >= 0.97 (TPOT off / adaptive)", f"{ratio:.3f}",
                        ratio >= 0.97))
    if split and split.get("split_cost_fraction") == split.get("split_cost_fraction"):
        f = split["split_cost_fraction"]
        out.append(("service split costs <= 5% of step time", f"{f:.1%}", f <= 0.05))
    return out


def markdown(report: dict) -> str:
    base = report.get("baseline", {})
    cfg = report.get("config", {})
    lines = ["# SpecServe system benchmark", "",
             f"Machine: {report.get('machine', {})}", "",
             f"Trace replay: windows of {cfg.get('requests_per_level')} requests per load level from row "
             f"{cfg.get('window_start')} of each trace; context lengths scaled so the window's median is "
             f"{cfg.get('context_tokens')} tokens (cap {cfg.get('max_context_tokens')}), outputs so the median is "
             f"{cfg.get('output_tokens')} (cap {cfg.get('max_output_tokens')}); arrival pattern kept, time-scaled to "
             "each load level's rate.", "",
             f"Baseline (plain decoding, batch 1): TTFT {_fmt(base.get('ttft_ms'))} ms, TPOT {_fmt(base.get('tpot_ms'))} ms; "
             f"capacity {_fmt(base.get('capacity_rps'), 3)} requests/s. SLOs per class: {base.get('slos')}.", ""]
    runs = report.get("runs", [])
    for level in sorted({r["level"] for r in runs}):
        lines += [f"## Load {level} x capacity", "",
                  "| policy | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | SLO attain | goodput req/s | tokens/s | "
                  "mean accepted len | acceptance by position | controller ms/step | rejected |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted((r for r in runs if r["level"] == level), key=lambda r: r["policy"]):
            t, p = r["ttft_ms"], r["tpot_ms"]
            pos = ", ".join(f"{x:.2f}" for x in r["acceptance_by_position"] if x is not None) or "-"
            lines.append(
                f"| {r['policy']} | {_fmt(t['p50'], 0)}/{_fmt(t['p90'], 0)}/{_fmt(t['p99'], 0)} | "
                f"{_fmt(p['p50'], 0)}/{_fmt(p['p90'], 0)}/{_fmt(p['p99'], 0)} | {r['slo_attainment']:.2f} | "
                f"{r['goodput_rps']:.3f} | {r['tokens_per_s']:.2f} | {r['mean_accepted_length']:.2f} | {pos} | "
                f"{r['controller_ms_per_step']:.2f} | {r['rejected']} |")
        lines.append("")
    split = report.get("split")
    if split:
        lines += ["## Service split", "",
                  f"Per step, time outside the models: {_fmt(split['overhead_ms_split'], 2)} ms through the services "
                  f"vs {_fmt(split['overhead_ms_local'], 2)} ms in one process; step time {_fmt(split['step_ms_split'])} ms "
                  f"vs {_fmt(split['step_ms_local'])} ms. Extra cost of the split: {split['split_cost_fraction']:.1%} "
                  "of step time.", ""]
    hf = report.get("hf_assisted")
    if hf:
        lines += ["## Hugging Face assisted generation (batch 1, same code prompts)", "",
                  f"{hf['ms_per_token']:.0f} ms per token.", ""]
    lines += ["## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {what} | {value} | {'yes' if ok else 'no'} |" for what, value, ok in targets(runs, split)]
    return "\n".join(lines) + "\n"


def plots(report: dict, out: Path) -> list[Path]:
    runs = report.get("runs", [])
    policies = sorted({r["policy"] for r in runs})
    levels = sorted({r["level"] for r in runs})
    paths = []
    for key, label, name in (("slo_attainment", "SLO attainment", "attainment.png"),
                             ("tpot_p99", "p99 TPOT (ms)", "tpot_p99.png")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for p in policies:
            ys = [next((r["tpot_ms"]["p99"] if key == "tpot_p99" else r[key]) for r in runs
                       if r["policy"] == p and r["level"] == lv) for lv in levels]
            ax.plot(levels, ys, marker="o", label=p, linewidth=2.5 if p == "adaptive" else 1)
        ax.set_xlabel("load (x capacity)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    fig, ax = plt.subplots(figsize=(7, 4))
    for lv in levels:
        at = {r["policy"]: r for r in runs if r["level"] == lv}
        if "off" not in at or not at["off"]["tokens_per_s"]:
            continue
        ks = sorted(int(p.split(":")[1]) for p in at if p.startswith("static:"))
        ax.plot(ks, [at[f"static:{k}"]["tokens_per_s"] / at["off"]["tokens_per_s"] for k in ks], marker="o",
                label=f"static k, load {lv}")
        if "adaptive" in at:
            ax.axhline(at["adaptive"]["tokens_per_s"] / at["off"]["tokens_per_s"], linestyle="--",
                       label=f"adaptive, load {lv}")
    ax.set_xlabel("static draft length k")
    ax.set_ylabel("speedup over off (tokens/s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_k.png", dpi=110)
    plt.close(fig)
    paths.append(out / "speedup_vs_k.png")
    return paths


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "system.md").write_text(markdown(report))
    plots(report, out)
