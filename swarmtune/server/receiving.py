"""Bytes of requests a server holds while it receives and serves them, charged to each peer.

A message arrives in frames over many seconds, and several streams may arrive at once. Each
frame is charged on its length prefix, before its body is read, and the charge stays until the reply has
gone, so no peer holds more than `per_peer` bytes of requests at once (one maximal message), and
all peers together no more than `total`. The last quarter of `total` is kept for peers within their
fair share (`total` over the peers holding some): a few flooders cannot fill the budget and make
everyone else's requests wait, and what they are told is their own excess (PeerOverLimit).

A stream's frame that does not fit waits for room (`Intake.reserve`) rather than being refused: its
sender is held back by the transport's flow control meanwhile, so a flooder's streams stall instead
of being refused, reopened and read again, and an honest large message goes through once there is
room. The stream's own timeout bounds the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from swarmtune.server.requests import PeerOverLimit, ServerBusy

HEADROOM = 4  # the last 1/HEADROOM of the budget goes only to peers within their share


class ReceiveBudget:
    """Used from the event loop only: plain counters suffice."""

    def __init__(self, total: int, per_peer: int):
        self.total, self.per_peer = total, per_peer
        self.used = 0
        self.by_peer: dict[str, int] = {}  # peers holding bytes, and how many
        self._released = asyncio.Event()

    def charge(self, peer: str, nbytes: int) -> None:
        mine = self.by_peer.get(peer, 0) + nbytes
        if mine > self.per_peer:
            raise PeerOverLimit(f"this peer's requests already hold {self.by_peer.get(peer, 0)} bytes here "
                                f"(limit {self.per_peer}): send one large message at a time")
        share = self.total / (len(self.by_peer) + (peer not in self.by_peer))
        if mine > share and self.used + nbytes > self.total - self.total // HEADROOM:
            raise PeerOverLimit(f"this peer's requests would hold {mine} bytes, more than its share ({share:.0f}) "
                                f"of the {self.total} that this server receives at once: try again later")
        if self.used + nbytes > self.total:
            raise ServerBusy(f"requests being received hold {self.used} of {self.total} bytes: try again later")
        self.by_peer[peer] = mine
        self.used += nbytes

    def release(self, peer: str, nbytes: int) -> None:
        if nbytes:
            self.by_peer[peer] -= nbytes
            self.used -= nbytes
            self._released.set()
        self._forget_if_idle(peer)

    async def released(self, timeout: float) -> None:
        """Until some bytes are released, or `timeout` seconds."""
        self._released.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._released.wait(), timeout)

    def _forget_if_idle(self, peer: str) -> None:
        if not self.by_peer.get(peer):
            self.by_peer.pop(peer, None)


class Intake:
    """What one stream (or one unary call) has charged to its peer, released at once when its message is
    served or the stream ends."""

    def __init__(self, budget: ReceiveBudget, peer: str, wait: float = 0.0):
        self.budget, self.peer, self.wait, self.nbytes = budget, peer, wait, 0
        self.short_of_room: str | None = None  # why a frame is waiting, while one is

    def charge(self, nbytes: int) -> None:
        self.budget.charge(self.peer, nbytes)
        self.nbytes += nbytes

    async def reserve(self, nbytes: int) -> None:
        """`charge`, waiting up to `wait` seconds for room; then the refusal that room would have ended."""
        deadline = time.monotonic() + self.wait
        while True:
            try:
                self.charge(nbytes)
                self.short_of_room = None
                return
            except ServerBusy as e:
                self.short_of_room = str(e)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                await self.budget.released(left)

    def timed_out(self, what: str) -> str:
        """The error text for a stream whose `what` timed out: why, if it was waiting for room."""
        return what if self.short_of_room is None else f"{what}, waiting for room: {self.short_of_room}"

    def release(self) -> None:
        self.budget.release(self.peer, self.nbytes)
        self.nbytes = 0
