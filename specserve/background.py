"""Long-running asyncio tasks with an owner: nothing runs unreferenced, stopping cancels and waits,
and a task that dies of an unexpected error says so in the log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Tasks:
    """The background tasks of one owner (a service, the scheduler, the gateway)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s died", task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        """Cancel every task and wait until all are over."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self) -> None:
        """Wait until every task is over, cancelling none."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def has(self, name: str) -> bool:
        """Whether a task of that name is still running."""
        return any(t.get_name() == name for t in self._tasks)


class Background:
    """An object that owns one long-running task: `start` it, `stop` cancels it and waits."""

    _task: asyncio.Task | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=type(self).__name__)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
