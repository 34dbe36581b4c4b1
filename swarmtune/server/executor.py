"""One compute thread per server, fed by a priority queue.

Blocks share one device; running requests one at a time keeps memory predictable and lets
interactive inference steps jump ahead of queued training work.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any

INFERENCE, FORWARD, BACKWARD = 0, 1, 2


class PriorityExecutor:
    def __init__(self, name: str = "compute"):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._counter = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def submit(self, priority: int, fn: Callable[..., Any], *args) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((priority, next(self._counter), fn, args, loop, future))
        return await future

    def _run(self) -> None:
        while True:
            priority, _, fn, args, loop, future = self._queue.get()
            if fn is None:
                return
            if future.cancelled():
                continue
            try:
                result, error = fn(*args), None
            except BaseException as e:  # delivered to the awaiting handler, which replies with it
                result, error = None, e
            loop.call_soon_threadsafe(_resolve, future, result, error)

    def shutdown(self) -> None:
        self._queue.put((-1, -1, None, (), None, None))
        self._thread.join(timeout=10)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
