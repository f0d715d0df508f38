"""The work a cache starts on its own and no request waits for: L2 writes after a fill, the
Redis half of an invalidation.  Kept so that ``HttpCache.drain`` can wait for it (graceful
shutdown, tests) and so that a task is never garbage-collected while it runs."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Background:
    """A set of running tasks; ``spawn`` adds one, it leaves the set when done."""

    __slots__ = ("tasks",)

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self.tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def wait(self) -> None:
        """Wait for the tasks running now (their failures are theirs: not raised here)."""
        if self.tasks:
            await asyncio.gather(*tuple(self.tasks), return_exceptions=True)


__all__ = ["Background"]
