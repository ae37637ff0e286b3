"""The `specserve` command: prepare models, run the whole system, talk to it."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from specserve import models


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    paths = models.prepare(Path(args.cache_dir), progress=not args.quiet)
    for role, path in paths.items():
        print(f"{role}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    models_p = sub.add_parser("models", help="manage the built-in model pair")
    models_sub = models_p.add_subparsers(dest="models_command", required=True)
    prep = models_sub.add_parser("prepare", help="install, check and convert the offline model pair")
    prep.add_argument("--cache-dir", default=str(models.default_cache_dir()))
    prep.add_argument("--quiet", action="store_true")
    prep.set_defaults(func=_cmd_models_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
