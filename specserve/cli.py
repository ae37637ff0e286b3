"""The `specserve` command: prepare models, run the whole system, talk to it."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from specserve import config as cfg
from specserve import pair


def runtime_names() -> tuple[str, ...]:
    from specserve.runtime import RUNTIMES

    return RUNTIMES


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    paths = pair.prepare(Path(args.cache_dir), torch_weights=args.torch, progress=not args.quiet)
    for role, path in paths.items():
        print(f"{role}: {path}")
    return 0


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _cmd_up(args: argparse.Namespace) -> int:
    from specserve import launcher

    target, draft = _pair(args)
    redis_url, redis_proc = os.environ.get("REDIS_URL", cfg.DEFAULT_REDIS_URL), None
    if not launcher.redis_reachable(redis_url):
        redis_url, redis_proc = launcher.start_redis()
        print(f"started redis-server at {redis_url}")
    stack = launcher.Stack(target, draft, redis_url, gateway_port=args.port, metrics_port=args.metrics_port,
                           http_port=args.http_port,
                           extra_env={"SPECSERVE_RUNTIME": args.runtime})
    print(f"starting verifier ({target}), drafter ({draft}), policy and gateway; logs in {stack.log_dir}", flush=True)
    status = 0
    try:
        try:
            stack.start(progress=lambda line: print(f"  {line}", flush=True))
        except (RuntimeError, TimeoutError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for name, info in stack.model_infos().items():
            print(f"{name}: {info.model_file}, runtime {info.runtime}, {info.dtype} on {info.device}")
        print(f"SpecServe is up: gateway at {stack.gateway_address} (gRPC), {stack.http_address}/v1 (OpenAI HTTP)"
              + (f", metrics at http://127.0.0.1:{args.metrics_port}/metrics" if args.metrics_port else ""))
        print(f"try: specserve generate --address {stack.gateway_address} 'def fibonacci(n):'")
        if args.smoke:
            _generate(stack.gateway_address, args.smoke, 16, 0.0, sys.stdout)
            return 0
        signal.signal(signal.SIGTERM, _interrupt)
        stack.supervise(on_event=lambda line: print(f"supervisor: {line}", flush=True))
        while not stack.failed:
            time.sleep(0.5)
        print(f"error: {stack.failed}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping", flush=True)
        stack.stop()
        if redis_proc:
            redis_proc.terminate()
    return status


def _generate(address: str, prompt: str, max_new_tokens: int, temperature: float, out, chat: bool = False) -> int:
    import grpc

    from specserve.v1 import gateway_pb2, gateway_pb2_grpc

    request = gateway_pb2.GenerateRequest(sampling={"max_new_tokens": max_new_tokens, "temperature": temperature})
    if chat:
        request.messages.messages.add(role="user", content=prompt)
    else:
        request.prompt = prompt
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            for message in stub.Generate(request):
                out.write(message.text)
                out.flush()
                if message.HasField("stats"):
                    s = message.stats
                    out.write(f"\n\n[{gateway_pb2.FinishReason.Name(message.finish_reason)}] "
                              f"{s.output_tokens} tokens, ttft {s.ttft_ms:.0f} ms, tpot {s.tpot_ms:.0f} ms, "
                              f"{s.steps} steps, {s.speculation}, slo_attained={s.slo_attained}\n")
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    return _generate(args.address, args.prompt, args.max_new_tokens, args.temperature, sys.stdout, args.chat)


def _cmd_ops(args: argparse.Namespace) -> int:
    import redis

    from specserve.errors import InvalidArgument
    from specserve.ops import OPS_KEYS, OPS_PREFIX, parse_op

    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    if args.ops_command == "set":
        try:
            parse_op(args.name, args.value)
        except InvalidArgument as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        client.set(OPS_PREFIX + args.name, args.value)
    if args.ops_command == "unset":
        client.delete(OPS_PREFIX + args.name)
    names = [args.name] if args.ops_command in ("get", "set", "unset") else list(OPS_KEYS)
    for name in names:
        value = client.get(OPS_PREFIX + name)
        print(f"{name} = {value if value is not None else '(unset)'}")
    return 0


def _pair(args: argparse.Namespace) -> tuple[str, str]:
    if args.target_model and args.draft_model:
        return args.target_model, args.draft_model
    torch_weights = getattr(args, "runtime", "auto") == "torch"
    paths = pair.prepare(Path(args.cache_dir), torch_weights=torch_weights)
    return str(paths["target"]), str(paths["draft"])


def _cmd_health(args: argparse.Namespace) -> int:
    from specserve.server import check_health

    healthy = check_health(args.address)
    print("SERVING" if healthy else "NOT_SERVING")
    return 0 if healthy else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    models_p = sub.add_parser("models", help="manage the built-in model pair")
    models_sub = models_p.add_subparsers(dest="models_command", required=True)
    prep = models_sub.add_parser("prepare", help="install, check and convert the offline model pair")
    prep.add_argument("--cache-dir", default=str(pair.default_cache_dir()))
    prep.add_argument("--torch", action="store_true", help="also convert to safetensors for the torch runtime")
    prep.add_argument("--quiet", action="store_true")
    prep.set_defaults(func=_cmd_models_prepare)

    up = sub.add_parser("up", help="run the whole system locally until Ctrl-C")
    up.add_argument("--target-model", default="", help="model folder or id (default: the built-in pair)")
    up.add_argument("--draft-model", default="")
    up.add_argument("--cache-dir", default=str(pair.default_cache_dir()))
    up.add_argument("--runtime", default=os.environ.get("SPECSERVE_RUNTIME", "auto"), choices=runtime_names(),
                    help="model runtime of verifier and drafter (auto: llama.cpp for GGUF models off CUDA)")
    up.add_argument("--port", type=int, default=50051, help="gateway port")
    up.add_argument("--metrics-port", type=int, default=9464)
    up.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP API port (0: a free one)")
    up.add_argument("--smoke", default="", help="send this prompt once the system is up, print, and stop")
    up.set_defaults(func=_cmd_up)

    gen = sub.add_parser("generate", help="stream a completion from a running gateway")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="127.0.0.1:50051")
    gen.add_argument("--max-new-tokens", type=int, default=0, help="0 takes the server's default")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--chat", action="store_true", help="send the prompt as one user chat turn")
    gen.set_defaults(func=_cmd_generate)

    ops = sub.add_parser("ops", help="read and write the live ops keys (specserve:ops:*)")
    ops.add_argument("--redis-url", default=os.environ.get("REDIS_URL", cfg.DEFAULT_REDIS_URL))
    ops_sub = ops.add_subparsers(dest="ops_command", required=True)
    ops_sub.add_parser("list")
    get = ops_sub.add_parser("get")
    get.add_argument("name")
    setp = ops_sub.add_parser("set")
    setp.add_argument("name")
    setp.add_argument("value")
    unset = ops_sub.add_parser("unset", help="remove an override: the strategy's or the default value applies again")
    unset.add_argument("name")
    ops.set_defaults(func=_cmd_ops)

    health = sub.add_parser("health", help="exit 0 when a service reports SERVING (for container health checks)")
    health.add_argument("address")
    health.set_defaults(func=_cmd_health)

    sub.add_parser("bench", add_help=False, help="benchmarks (python -m bench; see specserve bench --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # The benchmark is its own package that depends on this one, never the other way round.
        os.execv(sys.executable, [sys.executable, "-m", "bench", *argv[1:]])
    args = build_parser().parse_args(argv)
    cfg.setup_logging(args.log_level)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
