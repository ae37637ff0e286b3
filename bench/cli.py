"""The benchmark command: `python -m bench` (also `specserve bench`).

- `system` (default): the whole system under replayed traces, every policy and llama-server.
- `runtime`: cost tables of both runtimes, the stack against bare llama.cpp, policies against off,
  and (part `serve`) the whole stack against llama-server on chat requests.
- `serve`: load on any running OpenAI-compatible server, with vLLM's `vllm bench serve` flags and
  metrics (bench/serving.py; `specserve bench serve --help`).

The system benchmark replays the Azure LLM inference traces (2023 code and conversation CSVs);
`--traces DIR` names the folder that holds them (`azure_llm_2023_code.csv`, `azure_llm_2023_conv.csv`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specserve import config as cfg
from specserve import pair
from specserve.strategy import MODES

TRACE_FILES = {"code": "azure_llm_2023_code.csv", "chat": "azure_llm_2023_conv.csv"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", choices=["system", "runtime", "serve"], default="system",
                        help="serve takes its own flags (specserve bench serve --help)")
    parser.add_argument("--quick", action="store_true", help="one load, one repetition (minutes)")
    parser.add_argument("--target-model", default="", help="default: the built-in pair")
    parser.add_argument("--draft-model", default="")
    parser.add_argument("--traces", default="", help="system: folder of the Azure trace CSVs")
    parser.add_argument("--cache-dir", default=str(pair.default_cache_dir()))
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--redis-url", default="", help="default: a fresh redis-server for the run")
    parser.add_argument("--loads", default="", help="system: comma-separated offered concurrencies (default 1,2,4,8)")
    parser.add_argument("--policies", default="", help="system: comma-separated policies (default: all); runtime: ours in parts policies and serve")
    parser.add_argument("--peers", default=None,
                        help="comma-separated llama-server variants ('' for none); runtime: those in part serve")
    parser.add_argument("--workload", default="all", choices=["all", "fresh", "edits"],
                        help="runtime, part serve: the eight prompts, or their fresh or edit half")
    parser.add_argument("--proposer", default="", help="runtime, part serve: our drafter's proposer (default: its own)")
    parser.add_argument("--peers-first", action="store_true",
                        help="runtime, part serve: start the peers before our stack (start order weighs on decode speed)")
    parser.add_argument("--concurrency", default="", help="runtime: comma-separated client counts (default 1,4)")
    parser.add_argument("--rounds", type=int, default=0, help="runtime, parts serve and bursts: rounds per concurrency (default 3 and 4)")
    parser.add_argument("--prompts", type=int, default=0,
                        help="runtime, part policies: HumanEval and MT-Bench prompts per set (default 6)")
    parser.add_argument("--conversations", type=int, default=8,
                        help="runtime, part serve: two-turn MT-Bench conversations (0 skips)")
    parser.add_argument("--unused-drafter-pairs", type=int, default=None,
                        help="system: requests per stack in the unused-drafter check (default 8; 0 skips it)")
    parser.add_argument("--torch-requests", type=int, default=0,
                        help="system: add our torch runtime and Hugging Face generate on this many requests")
    parser.add_argument("--parts", default="", help="runtime: comma-separated parts (costs,decode,policies,http,bursts,serve,pages,saves)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def model_pair(args: argparse.Namespace, torch_weights: bool) -> tuple[str, str]:
    if args.target_model and args.draft_model:
        return args.target_model, args.draft_model
    paths = pair.prepare(Path(args.cache_dir), torch_weights=torch_weights)
    return str(paths["target"]), str(paths["draft"])


def runtime_config(args: argparse.Namespace, target: str, draft: str, redis_url: str):
    from bench import peers, runtime

    rcfg = runtime.RuntimeBenchConfig(target, draft, redis_url, Path(args.out))
    if args.quick:
        rcfg.contexts, rcfg.sessions, rcfg.prompts_per_set, rcfg.decode_rounds = (200,), (1, 4), 2, 1
        rcfg.serve_rounds = 1
    if args.parts:
        rcfg.parts = tuple(args.parts.split(","))
        unknown = [p for p in rcfg.parts if p not in runtime.PARTS]
        if unknown:
            raise SystemExit(f"--parts: unknown {', '.join(unknown)} (parts: {', '.join(runtime.PARTS)})")
    if args.policies:
        rcfg.policies = rcfg.serve_policies = tuple(args.policies.split(","))
    if args.prompts:
        rcfg.prompts_per_set = args.prompts
    if "policies" in rcfg.parts and "off" not in rcfg.policies:
        raise SystemExit("--policies: part policies compares each policy with off; name off too")
    if args.peers is not None:
        rcfg.serve_peers = tuple(p for p in args.peers.split(",") if p)
        unknown = [p for p in rcfg.serve_peers if p not in peers.VARIANTS]
        if unknown:
            raise SystemExit(f"--peers: unknown {', '.join(unknown)} (variants: {', '.join(peers.VARIANTS)})")
    rcfg.serve_workload, rcfg.serve_proposer, rcfg.serve_conversations = args.workload, args.proposer, args.conversations
    rcfg.serve_peers_first = args.peers_first
    if args.concurrency:
        rcfg.concurrency = tuple(int(c) for c in args.concurrency.split(","))
    if args.rounds:
        rcfg.serve_rounds = rcfg.bursts_rounds = args.rounds
    return rcfg


def system_config(args: argparse.Namespace, target: str, draft: str, redis_url: str):
    from bench import system

    if not args.traces:
        raise SystemExit("--traces: name the folder of the Azure trace CSVs (" + ", ".join(TRACE_FILES.values()) + ")")
    traces = {kind: Path(args.traces) / name for kind, name in TRACE_FILES.items()}
    missing = [str(p) for p in traces.values() if not p.exists()]
    if missing:
        raise SystemExit(f"--traces: missing {', '.join(missing)}")
    scfg = system.BenchConfig(target, draft, traces, redis_url, Path(args.out))
    if args.quick:
        scfg.loads, scfg.reps, scfg.ramp_peak, scfg.unused_drafter_pairs, scfg.split = (4,), 1, 4, 4, False
    scfg.torch_requests = args.torch_requests
    if args.unused_drafter_pairs is not None:
        if args.unused_drafter_pairs < 0:
            raise SystemExit(f"--unused-drafter-pairs: must be >= 0, got {args.unused_drafter_pairs}")
        scfg.unused_drafter_pairs = args.unused_drafter_pairs
    if args.loads:
        scfg.loads = tuple(int(x) for x in args.loads.split(","))
    if args.policies:
        scfg.policies = tuple(args.policies.split(","))
        scfg.ramp_policies = tuple(p for p in scfg.ramp_policies if p in scfg.policies)
    if args.peers is not None:
        scfg.peers = tuple(p for p in args.peers.split(",") if p)
    unknown = [p for p in scfg.peers if p not in system.PEERS] + [
        p for p in scfg.policies if p.partition(":")[0] not in MODES]
    if unknown:
        raise SystemExit(f"--policies/--peers: unknown {', '.join(unknown)} (policies: modes {', '.join(MODES)}"
                         f" with :k for static; peers: {', '.join(system.PEERS)})")
    return scfg


def run(which: str, config) -> str:
    """Run one benchmark on its config; returns the markdown report."""
    if which == "runtime":
        from bench import runtime

        return runtime.markdown(runtime.run(config))
    from bench import report, system

    return report.markdown(system.run(config))


def main(argv: list[str] | None = None) -> int:
    from specserve import launcher

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # its own flags, vLLM's, and no model pair or Redis of ours
        from bench import serving

        return serving.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.which == "serve":
        parser.error("serve comes first, then its own flags: specserve bench serve --base-url URL ...")
    cfg.setup_logging(args.log_level)
    # The runtime benchmark's cost table, and the system benchmark's full run, also measure the torch
    # runtime; the other parts run on the GGUF files alone, so they need no converted weights.
    costs = not args.parts or "costs" in args.parts.split(",")
    target, draft = model_pair(args, torch_weights=costs if args.which == "runtime" else args.torch_requests > 0)
    # A Redis of its own, so telemetry from earlier runs never feeds this run's policy.
    redis_url, redis_proc = (args.redis_url, None) if args.redis_url else launcher.start_redis()
    try:
        build = runtime_config if args.which == "runtime" else system_config
        print(run(args.which, build(args, target, draft, redis_url)))
        return 0
    finally:
        if redis_proc:
            redis_proc.terminate()


if __name__ == "__main__":
    sys.exit(main())
