"""Engine benchmark on the real pair, batch 1, greedy: target-only, static k = 1..5, n-gram lookup and
Hugging Face assisted generation, side by side in one run, configs interleaved per prompt so machine
drift hits all alike. Writes bench/results/engine.json and engine.md.
"""

from __future__ import annotations

import asyncio
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from bench import prompts as prompt_sets
from bench.report import position_sums
from bench.local import local_scheduler
from gateway.sequence import Sequence
from specserve.models import cpu_has_native_bf16, load_causal_lm
from specserve.tokenizer import load_tokenizer
from specserve.contracts import SamplingParams
from specserve.strategy import Strategy

CONFIGS = ["off", *(f"static:{k}" for k in range(1, 6)), "ngram:4", "hf-assisted", "hf-assisted:4"]


@dataclass
class Run:
    config: str
    prompt: int
    tokens: list[int]
    seconds: float
    drafted: int = 0
    accepted: int = 0
    position_drafted: list[int] = field(default_factory=list)
    position_accepted: list[int] = field(default_factory=list)


def run_ours(target, draft, tokenizer, eos, prompt: list[int], config: str, max_new: int) -> Run:
    mode, _, k = config.partition(":")
    strategy = Strategy(mode="off") if mode == "off" else Strategy(mode="static", static_k=int(k), max_draft_tokens=8)
    pos_d, pos_a = [0] * 64, [0] * 64

    def on_step(rec):
        for j, (d, a) in enumerate(zip(rec.position_drafted, rec.position_accepted)):
            pos_d[j] += d
            pos_a[j] += a

    async def go():
        sch = local_scheduler(target, draft if mode != "ngram" else None, tokenizer, eos, 32768, strategy=strategy,
                              proposer="ngram" if mode == "ngram" else "draft_model", on_step=on_step)
        sch.start()
        seq = Sequence("b", prompt, SamplingParams(max_new_tokens=max_new))
        started = time.perf_counter()
        sch.submit(seq)
        while not (await seq.out.get()).finish:
            pass
        elapsed = time.perf_counter() - started
        await sch.stop()
        return seq, elapsed

    seq, elapsed = asyncio.run(go())
    depth = max((j + 1 for j, d in enumerate(pos_d) if d), default=0)
    return Run(config, 0, seq.generated, elapsed, seq.draft_tokens, seq.accepted_tokens, pos_d[:depth], pos_a[:depth])


@torch.inference_mode()
def run_hf(target, draft, prompt: list[int], config: str, max_new: int, eos) -> Run:
    ids = torch.tensor([prompt])
    # Hugging Face's defaults (20 tokens, constant schedule, confidence threshold 0.4), or the same
    # with num_assistant_tokens=4; set in full every time, since generation_config is shared state.
    draft.generation_config.num_assistant_tokens = 4 if config.endswith(":4") else 20
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.4
    started = time.perf_counter()
    out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, max_new_tokens=max_new,
                          do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    return Run(config, 0, out[0, len(prompt):].tolist(), time.perf_counter() - started)


def main(target_dir: str, draft_dir: str, prompts: int, max_new: int, out_dir: Path) -> dict:
    tokenizer = load_tokenizer(target_dir)
    target, draft = load_causal_lm(target_dir), load_causal_lm(draft_dir)
    eos = [tokenizer.eos_token_id]
    texts = prompt_sets.humaneval()[:prompts]
    runs: list[Run] = []
    with tqdm(total=len(texts) * len(CONFIGS), desc="engine bench") as bar:
        for i, text in enumerate(texts):
            ids = tokenizer.encode(text, add_special_tokens=False)
            # Rotate the order per prompt so no configuration always runs first (warm caches, drift).
            for config in CONFIGS[i % len(CONFIGS):] + CONFIGS[: i % len(CONFIGS)]:
                run = run_hf(target, draft, ids, config, max_new, eos) if config.startswith("hf") else \
                    run_ours(target, draft, tokenizer, eos, ids, config, max_new)
                run.prompt = i
                runs.append(run)
                bar.update(1)
    report = summarise(runs, target, texts)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "engine.json").write_text(json.dumps({"summary": report, "runs": [r.__dict__ for r in runs]}, indent=1))
    (out_dir / "engine.md").write_text(markdown(report))
    return report


def summarise(runs: list[Run], target, texts) -> dict:
    base = {r.prompt: r for r in runs if r.config == "off"}
    rows = {}
    for config in CONFIGS:
        mine = [r for r in runs if r.config == config]
        drafted, accepted = sum(r.drafted for r in mine), sum(r.accepted for r in mine)
        pos_d = position_sums(r.position_drafted for r in mine)
        pos_a = position_sums(r.position_accepted for r in mine)
        rows[config] = {
            "speedup": sum(base[r.prompt].seconds for r in mine) / sum(r.seconds for r in mine),
            "tokens_per_s": sum(len(r.tokens) for r in mine) / sum(r.seconds for r in mine),
            "acceptance_rate": accepted / drafted if drafted else None,
            "acceptance_by_position": [a / d if d else None for a, d in zip(pos_a, pos_d)],
            "identical_to_target": sum(r.tokens == base[r.prompt].tokens for r in mine) / len(mine),
        }
    return {"prompts": len(texts), "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "dtype": str(target.dtype), "native_bf16": cpu_has_native_bf16(), "configs": rows}


def markdown(report: dict) -> str:
    lines = [f"# Engine benchmark ({report['prompts']} HumanEval prompts, batch 1, greedy, {report['dtype']})", "",
             "| config | speedup vs target-only | tokens/s | acceptance rate | acceptance by position | identical |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in report["configs"].items():
        pos = ", ".join(f"{p:.2f}" for p in row["acceptance_by_position"] if p is not None) or "-"
        lines.append(f"| {name} | {row['speedup']:.2f} | {row['tokens_per_s']:.2f} | "
                     f"{row['acceptance_rate'] if row['acceptance_rate'] is None else round(row['acceptance_rate'], 2)} | {pos} | {row['identical_to_target']:.0%} |")
    return "\n".join(lines) + "\n"
