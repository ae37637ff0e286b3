"""Model calls off the event loop: one dedicated thread runs them in turn; handlers await them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    """Runs model calls one at a time on a dedicated thread; handlers await them."""

    def __init__(self, delay_ms: float = 0.0):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.delay_s = delay_ms / 1000

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn, args)

    def _call(self, fn: Callable[..., T], args: tuple) -> T:
        if self.delay_s:
            time.sleep(self.delay_s)
        return fn(*args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
