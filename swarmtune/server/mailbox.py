"""Hidden states pushed by the previous server of a chain, waiting for the step that needs them.

With chaining, a client announces a step to every server of its chain at once; each server sends
its output straight to the next one. A push may arrive before or after the client's message for
the same step, so pushes are kept here by step number (a few at most) until taken.
"""

from __future__ import annotations

import asyncio
import time

import torch

MAX_WAITING = 4


class Mailbox:
    """Pushes for one session, taken only from its client (`owner`) or the server it named as the previous
    one of its chain (`upstream`): anyone else knowing the session id could otherwise write its inputs."""

    def __init__(self, owner: str, upstream: str | None = None):
        self.owner, self.upstream = owner, upstream
        self._items: dict[int, torch.Tensor] = {}
        self._arrived = asyncio.Event()

    def put(self, step: int, hidden: torch.Tensor) -> None:
        self._items[step] = hidden
        while len(self._items) > MAX_WAITING:  # never taken (the client sent that step itself): forget
            del self._items[min(self._items)]
        self._arrived.set()

    async def take(self, step: int, timeout: float) -> torch.Tensor | None:
        """The push for `step`, waiting up to `timeout`; None if it did not come."""
        deadline = time.monotonic() + timeout
        while step not in self._items:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return None
        for old in [s for s in self._items if s < step]:
            del self._items[old]
        return self._items.pop(step)
