"""Run the gateway: python -m gateway --tokenizer PATH --verifier HOST:PORT [--drafter HOST:PORT]."""

from __future__ import annotations

import asyncio
import sys

from gateway.app import GatewayConfig, serve
from specserve import config as cfg


def main(argv: list[str] | None = None) -> None:
    cfg.setup_logging()
    config = cfg.load(GatewayConfig, sys.argv[1:] if argv is None else argv, prog="gateway")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
