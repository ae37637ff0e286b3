"""Run the gateway: python -m gateway --tokenizer PATH --verifier HOST:PORT [--drafter HOST:PORT]."""

from __future__ import annotations

import asyncio
import sys

from gateway.app import GatewayConfig, serve
from specserve import config as cfg
from specserve import lifeline


def main(argv: list[str] | None = None) -> None:
    cfg.setup_logging()
    lifeline.follow()  # end with the launcher that started this process, if any
    config = cfg.load(GatewayConfig, sys.argv[1:] if argv is None else argv, prog="gateway")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
