"""Hidden states pushed by the previous server of a chain, waiting for the step that needs them.

With chaining, a client announces a step to every server of its chain at once; each server sends
its output straight to the next one. A push may arrive before or after the client's message for
the same step, so pushes are kept here by step number (a few at most) until taken.
"""

from __future__ import annotations

import asyncio
import hmac
import time

import torch

MAX_WAITING = 4


class Mailbox:
    """Pushes for one session, taken only with its push key: a random capability the session's client gave this
    hop (when opening, or anew when the chain before it changed) and hands only to the server it wants to push
    here. Who sends a push proves nothing: any server that was once upstream of a session knows its id, and
    pushes whatever a client of its own names."""

    def __init__(self, key: str | None):
        self.key = key  # None: no push is taken (the client sends every input itself)
        self._items: dict[int, torch.Tensor] = {}
        self._arrived = asyncio.Event()

    def admits(self, key: object) -> bool:
        return self.key is not None and isinstance(key, str) and hmac.compare_digest(key, self.key)

    def rekey(self, key: str) -> None:
        """A new key (the chain before this hop changed): what the old one let in is dropped too."""
        self.key = key
        self._items.clear()

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
