"""How fast a peer is served: its requests per second, and how soon it hears that it is over a limit.

Rates are token buckets, constant work per request whatever the rate. A peer's bucket holds up to one
second's worth of requests and refills at the configured rate, so a peer may burst to the limit and
then keeps to it. A malformed request may be charged several tokens (refusing costs the server too);
the debt that leaves is bounded, so a peer is never shut out for longer than a couple of seconds.
Refusals for a peer's own excess are held back a while (Tarpit).
"""

from __future__ import annotations

import asyncio
import time

MAX_PEERS = 10_000  # buckets kept; beyond this, full ones (peers idle for a second) are forgotten
SWEEP_PERIOD = 1.0  # seconds between such sweeps, so a crowd of peers cannot make every request sweep


class RateLimiter:
    """Used from the event loop only."""

    def __init__(self, rate: float):
        self.rate = rate
        self._buckets: dict[str, list[float]] = {}  # peer -> [tokens, when last refilled]
        self._swept = 0.0

    def admit(self, peer: str, cost: float = 1.0) -> bool:
        """Take `cost` requests' tokens; False when the peer has not that many left (nothing is taken then). A cost
        over half a second's worth is admitted once the peer has that much left, into debt."""
        bucket = self._refilled(peer)
        if bucket[0] < min(cost, self.rate / 2):
            return False
        bucket[0] = max(bucket[0] - cost, -self.rate)
        return True

    def wait(self, peer: str, cost: float = 1.0) -> float:
        """Seconds until `admit(peer, cost)` would succeed, if nothing else is taken meanwhile."""
        return max(0.0, (min(cost, self.rate / 2) - self._refilled(peer)[0]) / self.rate)

    def charge(self, peer: str, tokens: float) -> None:
        """Charge `tokens` more to the peer, into debt of at most one second's worth."""
        bucket = self._refilled(peer)
        bucket[0] = max(bucket[0] - tokens, -self.rate)

    def _refilled(self, peer: str) -> list[float]:
        now = time.monotonic()
        bucket = self._buckets.get(peer)
        if bucket is None:
            if len(self._buckets) >= MAX_PEERS and now - self._swept > SWEEP_PERIOD:
                self._swept = now
                self._buckets = {p: b for p, b in self._buckets.items() if self._level(b, now) < self.rate}
            bucket = self._buckets[peer] = [self.rate, now]
        else:
            bucket[0], bucket[1] = self._level(bucket, now), now
        return bucket

    def _level(self, bucket: list[float], now: float) -> float:
        return min(self.rate, bucket[0] + (now - bucket[1]) * self.rate)


HELD_PER_PEER = 64   # refusals held at once for one peer; more go out at once
HELD_IN_ALL = 1024   # and for all peers together (each holds a task, and a stream or a pending call)


class Tarpit:
    """Holds refusals for peers over their own limits before they go out.

    Refused at once, a flooder that waits for its answers (most do) comes straight back: thousands of
    requests a second, each passing through both daemons and this server's event loop. Held for
    `delay`, each of its requests in flight is answered once a second. A held refusal costs a sleeping
    task; beyond HELD_PER_PEER for a peer, or HELD_IN_ALL in all, refusals go out at once."""

    def __init__(self, delay: float):
        self.delay = delay
        self.held: dict[str, int] = {}
        self.total = 0

    async def hold(self, peer: str) -> bool:
        """Wait `delay` unless too much is held already; whether it waited."""
        if self.delay <= 0 or self.total >= HELD_IN_ALL or self.held.get(peer, 0) >= HELD_PER_PEER:
            return False
        self.held[peer] = self.held.get(peer, 0) + 1
        self.total += 1
        try:
            await asyncio.sleep(self.delay)
            return True
        finally:
            self.total -= 1
            self.held[peer] -= 1
            if not self.held[peer]:
                del self.held[peer]
