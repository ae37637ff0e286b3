"""The system benchmark's report: per-load tables pooled over repetitions, ratios against `off` with
bootstrap intervals, the summary and targets, and PNG plots."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

from bench.ramp import worst_switch
from bench.stats import ratio_ci
from gateway.planner import EXPLORE_SHARE

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASE = "off"
PEER = "llama-server"  # plain, prompt cache on: the serving core's yardstick
PROPOSERS = {"free": "suffix", "model": "model"}  # the report's split of draft acceptance by proposer
MAX_POSITIONS_SHOWN = 12  # the acceptance table's columns (free drafts run to 24)


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
    if x is None or x != x:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ci(r: dict) -> str:
    if r["n"] == 0 or r["ratio"] != r["ratio"]:
        return "-"
    return f"{r['ratio']:.3f} ({r['low']:.3f}-{r['high']:.3f}) {r['verdict']}"


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class Pooled:
    """Requests and runs of one benchmark, pooled over repetitions per (system, load)."""

    def __init__(self, report: dict):
        self.runs = report.get("runs", [])
        self.systems = list(dict.fromkeys(r["system"] for r in self.runs))
        self.loads = sorted({r["load"] for r in self.runs})
        self.duration = {(r["system"], r["load"], r["rep"]): r["duration_s"] for r in self.runs}
        self.requests: dict[tuple[str, int], dict] = defaultdict(dict)
        for q in report.get("requests", []):
            if (q["system"], q["load"], q["rep"]) in self.duration:
                self.requests[(q["system"], q["load"])][(q["rep"], q["klass"], q["index"])] = q

    def at(self, load: int) -> list[str]:
        return [s for s in self.systems if self.requests.get((s, load))]

    def goodput(self, system: str, load: int) -> float:
        reqs = self.requests[(system, load)].values()
        total = sum(self.duration[(system, load, rep)] for rep in {q["rep"] for q in reqs})
        return sum(q["output_tokens"] for q in reqs if q["slo_met"]) / total if total else 0.0

    def _contribution(self, system: str, load: int) -> dict:
        """Per request, its output tokens per second of its run if it met its SLO, else 0: their
        mean over pairs is proportional to goodput."""
        return {k: (q["output_tokens"] / self.duration[(system, load, q["rep"])] if q["slo_met"] else 0.0)
                for k, q in self.requests[(system, load)].items()}

    def goodput_ratio(self, system: str, other: str, load: int) -> dict:
        a, b = self._contribution(system, load), self._contribution(other, load)
        keys = sorted(a.keys() & b.keys())
        return ratio_ci([a[k] for k in keys], [b[k] for k in keys])

    def speedup(self, system: str, other: str, load: int) -> dict:
        """Mean TPOT of `other` over that of `system`, on requests both completed (> 1 means
        `system` is faster)."""
        a, b = self.requests[(system, load)], self.requests[(other, load)]
        keys = sorted(k for k in a.keys() & b.keys() if a[k]["output_tokens"] > 1 and b[k]["output_tokens"] > 1
                      and a[k]["status"] == 200 == b[k]["status"])
        return ratio_ci([b[k]["tpot_ms"] for k in keys], [a[k]["tpot_ms"] for k in keys])

    def attainment(self, system: str, load: int) -> float:
        reqs = self.requests[(system, load)].values()
        return sum(q["slo_met"] for q in reqs) / len(reqs) if reqs else 0.0

    def latency(self, system: str, load: int, key: str) -> list[float]:
        return [q[key] for q in self.requests[(system, load)].values()
                if q["status"] == 200 and (key != "tpot_ms" or q["output_tokens"] > 1)]

    def spec(self, system: str, load: int, key: str):
        """A speculation figure over the repetitions: the mean accepted length averaged, counts summed."""
        values = [r[key] for r in self.runs if r["system"] == system and r["load"] == load and r.get(key) is not None]
        if not values:
            return None
        return sum(values) / len(values) if key == "mean_accepted_length" else sum(values)

    def conditional_acceptance(self, system: str, load: int | None = None, proposer: str = "all"
                               ) -> list[float | None]:
        """Per draft position, accepted there / reached there, over the repetitions (and loads), for
        the drafts of every proposer, the free proposer's ("free") or the draft model's ("model")."""
        runs = [r for r in self.runs if r["system"] == system and (load is None or r["load"] == load)]
        counts = {f"{pre}{name}": position_sums(r.get(f"{pre}{name}") or () for r in runs)
                  for pre in ("", "free_") for name in ("position_accepted", "position_reached")}
        if proposer == "free":
            accepted, reached = counts["free_position_accepted"], counts["free_position_reached"]
        elif proposer == "model":
            accepted, reached = ([v - f for v, f in zip(counts[name], counts[f"free_{name}"] + [0] * len(counts[name]))]
                                 for name in ("position_accepted", "position_reached"))
        else:
            accepted, reached = counts["position_accepted"], counts["position_reached"]
        return [a / n if n else None for a, n in zip(accepted, reached)]

    def explored_share(self, system: str, load: int) -> float | None:
        """The share of step time that exploration probes added (their predicted extra time over
        plain decoding, what the exploration budget charges)."""
        runs = [r for r in self.runs if r["system"] == system and r["load"] == load and r.get("step_ms")]
        total = sum(r["step_ms"] for r in runs)
        return sum(r.get("explored_ms", 0.0) for r in runs) / total if total else None

    def prefix_hit(self, system: str, load: int) -> float | None:
        """Prompt tokens served from the prefix cache over all prompt tokens, where the server said."""
        told = [q for q in self.requests[(system, load)].values() if q.get("cached_tokens") is not None]
        prompt = sum(q["prompt_tokens"] for q in told)
        return sum(q["cached_tokens"] for q in told) / prompt if prompt else None

    def best(self, load: int, systems: list[str]) -> str:
        """Of `systems`, the one with the highest goodput at `load`."""
        return max((s for s in systems if s in self.at(load)), key=lambda s: self.goodput(s, load))


def summary(pooled: Pooled) -> tuple[list[str], list[tuple[str, str, bool]]]:
    """The report's verdict lines per load, and the targets as (what, measured, met): `off` against
    plain llama-server (the serving core), `adaptive` against `off` and against the best speculating
    llama-server (speculation). A ratio whose interval holds 1 is a tie, which meets an "at or
    above" target."""
    lines, checks = [], []
    for load in pooled.loads:
        here = pooled.at(load)
        attain = {s: pooled.attainment(s, load) for s in here}
        parts = []
        if BASE in here and PEER in here:
            vs_peer = pooled.goodput_ratio(BASE, PEER, load)
            parts.append(f"`off` / `{PEER}` goodput {_ci(vs_peer)}, speed (TPOT) {_ci(pooled.speedup(BASE, PEER, load))}")
            checks.append((f"load {load}: off goodput at or above {PEER}", _ci(vs_peer), vs_peer["verdict"] != "loss"))
            checks.append((f"load {load}: off SLO attainment at or above {PEER}",
                           f"{attain[BASE]:.2f} vs {attain[PEER]:.2f}", attain[BASE] >= attain[PEER]))
        if BASE in here and load == min(pooled.loads):
            refused = pooled.spec(BASE, load, "refused") or 0
            checks.append((f"load {load}: off refuses nothing", f"{refused} refused", refused == 0))
        if "adaptive" in here and BASE in here:
            vs_off = pooled.goodput_ratio("adaptive", BASE, load)
            parts.append(f"`adaptive` / `off` goodput {_ci(vs_off)}, speed {_ci(pooled.speedup('adaptive', BASE, load))}")
            checks.append((f"load {load}: adaptive goodput >= 0.97 x off", _ci(vs_off), vs_off["ratio"] >= 0.97))
        speculating = [s for s in here if s.startswith(PEER + "-")]
        if "adaptive" in here and speculating:
            best = pooled.best(load, speculating)
            vs_best = pooled.goodput_ratio("adaptive", best, load)
            parts.append(f"`adaptive` / `{best}` (the best speculating peer here) goodput {_ci(vs_best)}, "
                         f"speed {_ci(pooled.speedup('adaptive', best, load))}")
            checks.append((f"load {load}: adaptive goodput at or above the best speculating peer ({best})",
                           _ci(vs_best), vs_best["verdict"] != "loss"))
        if parts:
            lines.append(f"- Load {load}: " + "; ".join(parts) + "; SLO attainment "
                         + ", ".join(f"{s} {a:.2f}" for s, a in attain.items()) + ".")
    return lines, checks


def ramp_checks(ramp: dict | None) -> list[tuple[str, str, bool]]:
    out = []
    for policy, run in (ramp or {}).get("policies", {}).items():
        switches = run["switches"]
        compared, worst = worst_switch(switches)
        out.append((f"ramp, {policy}: no switching step over 1.5x the steps of the state it switched to",
                    f"{len(switches)} switches ({compared} with steps of their state at their batch size), "
                    f"worst {_fmt(worst, 2)}x", not any(s["stall"] for s in switches)))
    return out


def markdown(report: dict) -> str:
    cfg, base, machine = report.get("config", {}), report.get("baseline", {}), report.get("machine", {})
    pooled = Pooled(report)
    lines = ["# SpecServe system benchmark", "",
             f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores, CPU flags {', '.join(machine.get('cpu_flags', []))}; "
             f"Python {machine.get('python')}, torch {machine.get('torch')}, transformers {machine.get('transformers')}, "
             f"llama-cpp-python {machine.get('llama_cpp_python')}. Models: {report.get('versions', {})}. "
             f"Peer binary: {report.get('peers', {}).get('binary')}; skipped: {report.get('peers', {}).get('skipped') or 'none'}; "
             f"failed to start: {report.get('peers', {}).get('failed') or 'none'}.",
             "", f"Run time: {_fmt(report.get('minutes'))} minutes.", "",
             f"Workload: {cfg.get('requests')} requests per system, load and repetition, half code (HumanEval code "
             "edits through the chat template, alternating with HumanEval completions), half conversation (ShareGPT "
             "first turns through the chat template), prompt and output lengths as the data give them (the answer's "
             f"tokens), capped at {cfg.get('max_context_tokens')} prompt and {cfg.get('max_output_tokens')} output "
             f"tokens; {cfg.get('reps')} repetitions, so {(cfg.get('requests') or 0) * (cfg.get('reps') or 0)} paired "
             "requests per system and load; systems in an order rotated per load and repetition. Each class arrives "
             f"at the times of its Azure trace's window (from row {cfg.get('window_start')}), time-scaled so load c "
             f"sends c requests per lone-request latency; {cfg.get('threads')} threads for every model, our maximum "
             f"batch {cfg.get('max_batch_size')} = llama-server's `-np`. Every system gets the same token-id prompts "
             "over the OpenAI-compatible HTTP API (`/v1/completions`, streamed), greedy, timed by the same client.", "",
             f"Lone request ({base.get('prompt_tokens')} prompt, {base.get('output_tokens')} output tokens: the "
             f"workload's medians), plain decoding: TTFT {_fmt(base.get('ttft_ms'))} ms, TPOT {_fmt(base.get('tpot_ms'))} ms, "
             f"latency {_fmt(base.get('total_ms'))} ms. SLOs: {base.get('slos')}. Goodput: output tokens per second of "
             "requests that met both objectives (a refused request meets none). Ratios: bootstrap 95% intervals over "
             "paired requests; a difference whose interval holds 1 is a tie.", ""]
    summary_lines, checks = summary(pooled)
    lines += ["## Summary", ""] + summary_lines + [""]
    for load in pooled.loads:
        lines += [f"## Load {load}", "",
                  "| system | TTFT p50/p99 ms | TPOT p50/p99 ms | SLO attain | goodput tok/s | goodput / off | "
                  "speed / off (TPOT) | mean accepted len | drafted | pruned | refused | prefix hit |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for s in pooled.at(load):
            ttft, tpot = pooled.latency(s, load, "ttft_ms"), pooled.latency(s, load, "tpot_ms")
            has_base = BASE in pooled.at(load) and s != BASE
            lines.append(
                f"| {s} | {_fmt(_pct(ttft, .5), 0)}/{_fmt(_pct(ttft, .99), 0)} | {_fmt(_pct(tpot, .5), 0)}/"
                f"{_fmt(_pct(tpot, .99), 0)} | {pooled.attainment(s, load):.2f} | {pooled.goodput(s, load):.2f} | "
                f"{_ci(pooled.goodput_ratio(s, BASE, load)) if has_base else '-'} | "
                f"{_ci(pooled.speedup(s, BASE, load)) if has_base else '-'} | "
                f"{_fmt(pooled.spec(s, load, 'mean_accepted_length'), 2)} | {_fmt(pooled.spec(s, load, 'drafted_slots'))} | "
                f"{_fmt(pooled.spec(s, load, 'pruned_slots'))} | {_fmt(pooled.spec(s, load, 'refused'))} | "
                f"{'-' if (hit := pooled.prefix_hit(s, load)) is None else f'{hit:.1%}'} |")
        lines.append("")
    lines += acceptance_table(pooled, "acceptance.png")
    lines += _extras(report)
    checks += ramp_checks(report.get("ramp"))
    for key, r in (report.get("unused_drafter") or {}).items():
        checks.append((f"off with an unused drafter costs the same as no drafter, {key} within 2%", _ci(r),
                       r["verdict"] == "tie" and abs(r["ratio"] - 1) <= 0.02))
    if report.get("minutes") is not None:
        checks.append(("run time", f"{report['minutes']:.1f} min", True))
    lines += ["## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {what} | {value} | {'yes' if ok else 'no'} |" for what, value, ok in checks]
    lines += ["", "## Plots", "", "![goodput vs load](goodput_vs_load.png)", "", "![TPOT CDF per load](tpot_cdf.png)"]
    if report.get("ramp"):
        lines += ["", "![load ramp: k, batch size and TPOT per step](ramp.png)"]
    return "\n".join(lines) + "\n"


def acceptance_table(pooled: "Pooled", plot: str = "", load_name: str = "load") -> list[str]:
    """Conditional acceptance per draft position and proposer (every load pooled) and the exploring
    share per load (`load_name`: what the runs' loads are), with the plot of the same if named."""
    rows = {(s, proposer): pooled.conditional_acceptance(s, proposer=proposer) for s in pooled.systems
            for proposer in PROPOSERS}
    rows = {key: rates for key, rates in rows.items() if any(v is not None for v in rates)}
    if not rows:
        return []
    depth = min(max(len(r) for r in rows.values()), MAX_POSITIONS_SHOWN)
    lines = ["## Acceptance per draft position", "",
             f"Accepted at a position / reached there (every earlier draft accepted), every {load_name} pooled, per "
             "proposer (suffix: the free lookup's drafts; model: the draft model's); exploring: the share of "
             f"step time that probe drafts added (the budget allows {EXPLORE_SHARE:.0%}), per {load_name}.", "",
             "| system | proposer | " + " | ".join(f"pos {j + 1}" for j in range(depth)) + f" | exploring by {load_name} |",
             "| --- " * (depth + 3) + "|"]
    for (s, proposer), rates in rows.items():
        explored = ", ".join(f"{load}: {_fmt(100 * share, 2)}%" for load in pooled.loads
                             if (share := pooled.explored_share(s, load)) is not None)
        lines.append(f"| {s} | {PROPOSERS[proposer]} | "
                     + " | ".join(_fmt(rates[j], 2) if j < len(rates) else "-" for j in range(depth))
                     + f" | {explored or '-'} |")
    return lines + (["", f"![acceptance per draft position]({plot})"] if plot else []) + [""]


def _extras(report: dict) -> list[str]:
    lines = []
    ramp = report.get("ramp")
    if ramp:
        lines += ["## Load ramp", "", f"Closed-loop concurrency schedule (start s, concurrency): {ramp['schedule']}.", "",
                  "| policy | steps | switches of speculation | with steps of their state at their batch size "
                  "| worst switching step / steps of its state | completed |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for policy, run in ramp["policies"].items():
            compared, worst = worst_switch(run["switches"])
            lines.append(f"| {policy} | {len(run['series'])} | {len(run['switches'])} | {compared} | {_fmt(worst, 2)} | "
                         f"{run['completed']}/{run['requests']} |")
        lines.append("")
    unused = report.get("unused_drafter")
    if unused:
        lines += ["## A drafter configured but unused", "",
                  "`off` with the drafter over a stack without one, alternated one request at a time: mean latency "
                  f"{_ci(unused['total_ms'])}, mean TPOT {_ci(unused['tpot_ms'])}.", ""]
    split = report.get("split")
    if split:
        lines += ["## Service split", "",
                  f"Per step, time outside the models: {_fmt(split['overhead_ms_split'], 2)} ms through the services "
                  f"vs {_fmt(split['overhead_ms_local'], 2)} ms in one process; step time {_fmt(split['step_ms_split'])} ms "
                  f"vs {_fmt(split['step_ms_local'])} ms: {split['split_cost_fraction']:.1%} of step time.", ""]
    torch_part = report.get("torch")
    if torch_part:
        lines += ["## torch runtime and Hugging Face generate (same code requests)", "",
                  "| what | ms per output token |", "| --- | --- |"]
        lines += [f"| SpecServe torch runtime, {k.replace('@', ', concurrency ')} | {v['mean_tpot_ms']:.1f} |"
                  for k, v in torch_part["stack"].items()]
        lines += [f"| Hugging Face generate, batch 1, {k} | {v['mean_ms_per_token']:.1f} |"
                  for k, v in torch_part["hf"].items()]
        lines.append("")
    return lines


def plots(report: dict, out: Path) -> list[Path]:
    pooled = Pooled(report)
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for s in pooled.systems:
        loads = [lv for lv in pooled.loads if s in pooled.at(lv)]
        ax.plot(loads, [pooled.goodput(s, lv) for lv in loads], marker="o", label=s,
                linestyle="--" if s.startswith("llama-server") else "-", linewidth=2.5 if s == "adaptive" else 1.2)
    ax.set_xlabel("offered load (concurrency)")
    ax.set_ylabel("goodput (output tokens/s within SLO)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(_save(fig, out / "goodput_vs_load.png"))

    fig, axes = plt.subplots(1, max(1, len(pooled.loads)), figsize=(4 * max(1, len(pooled.loads)), 3.8), squeeze=False)
    for ax, load in zip(axes[0], pooled.loads):
        for s in pooled.at(load):
            values = sorted(pooled.latency(s, load, "tpot_ms"))
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=s,
                        linestyle="--" if s.startswith("llama-server") else "-")
        ax.set_title(f"load {load}")
        ax.set_xlabel("TPOT (ms)")
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    paths.append(_save(fig, out / "tpot_cdf.png"))

    rates = {f"{s} ({PROPOSERS[proposer]})": pooled.conditional_acceptance(s, proposer=proposer)
             for s in pooled.systems for proposer in PROPOSERS}
    rates = {s: r for s, r in rates.items() if any(v is not None for v in r)}
    if rates:
        fig, ax = plt.subplots(figsize=(7, 4))
        for s, r in rates.items():
            points = [(j + 1, v) for j, v in enumerate(r) if v is not None]
            ax.plot([j for j, _ in points], [v for _, v in points], marker="o", label=s)
        ax.set_xlabel("draft position")
        ax.set_ylabel("accepted / reached")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out / "acceptance.png"))

    ramp = report.get("ramp")
    if ramp:
        fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
        for policy, run in ramp["policies"].items():
            t = [s["t"] for s in run["series"]]
            for ax, key in zip(axes, ("k", "batch", "tpot_ms")):
                ax.plot(t, [s[key] for s in run["series"]], label=policy, linewidth=1.8 if policy == "adaptive" else 0.8)
        for ax, label in zip(axes, ("drafts per session (k)", "batch size", "step TPOT (ms)")):
            ax.set_ylabel(label)
        axes[-1].set_xlabel("seconds into the ramp")
        axes[0].legend(fontsize=7, ncol=4)
        fig.tight_layout()
        paths.append(_save(fig, out / "ramp.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "system.md").write_text(markdown(report))
    plots(report, out)
