"""Bytes of requests a server holds while it receives and serves them, charged to each peer.

A message arrives in frames over many seconds, and several streams may arrive at once. Each
frame is charged on its length prefix, before its body is read, and the charge stays until the reply has
gone, so no peer holds more than `per_peer` bytes of requests at once (one maximal message), and
all peers together no more than `total`. The last quarter of `total` is kept for peers within their
fair share (`total` over the peers holding some): a few flooders cannot fill the budget and make
everyone else's requests wait, and their refusals are for their own excess (PeerOverLimit).
"""

from __future__ import annotations

from swarmtune.server.requests import PeerOverLimit, ServerBusy

HEADROOM = 4  # the last 1/HEADROOM of the budget goes only to peers within their share


class ReceiveBudget:
    """Used from the event loop only: plain counters suffice."""

    def __init__(self, total: int, per_peer: int):
        self.total, self.per_peer = total, per_peer
        self.used = 0
        self.by_peer: dict[str, int] = {}  # peers holding bytes, and how many

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
        self._forget_if_idle(peer)

    def _forget_if_idle(self, peer: str) -> None:
        if not self.by_peer.get(peer):
            self.by_peer.pop(peer, None)


class Intake:
    """What one stream (or one unary call) has charged to its peer, released at once when its message is
    served or the stream ends."""

    def __init__(self, budget: ReceiveBudget, peer: str):
        self.budget, self.peer, self.nbytes = budget, peer, 0

    def charge(self, nbytes: int) -> None:
        self.budget.charge(self.peer, nbytes)
        self.nbytes += nbytes

    def release(self) -> None:
        self.budget.release(self.peer, self.nbytes)
        self.nbytes = 0
