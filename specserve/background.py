"""A long-running asyncio task owned by an object: `start` it, `stop` cancels it and waits."""

from __future__ import annotations

import asyncio


class Background:
    _task: asyncio.Task | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
