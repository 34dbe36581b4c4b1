"""Servers a client stopped trusting for a while: each failure bans its server for longer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

MAX_WAITS = 3  # refusals for the client's own request rate waited out in a row before the server is banned


@dataclass
class Bans:
    """Servers that failed recently, each banned for an exponentially growing time."""

    base: float = 2.0
    max: float = 300.0
    until: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    stale: dict[str, float] = field(default_factory=dict)  # peer -> expiry of the record it failed under
    waited: dict[str, int] = field(default_factory=dict)  # peer -> its refusals for our rate waited out in a row

    def ban(self, peer_id: str, record_expires: float | None = None) -> float:
        """Ban for a growing time. With `record_expires`, the server also stays out until it announces
        itself again: a dead server's record outlives it, and retrying it would cost a timeout each time."""
        count = self.failures.get(peer_id, 0)
        duration = min(self.max, self.base * 2 ** count)
        self.failures[peer_id] = count + 1
        self.until[peer_id] = time.monotonic() + duration
        if record_expires is not None:
            self.stale[peer_id] = record_expires
        return duration

    def banned(self, peer_id: str, record_expires: float | None = None) -> bool:
        if self.until.get(peer_id, 0.0) > time.monotonic():
            return True
        return record_expires is not None and record_expires <= self.stale.get(peer_id, float("-inf"))

    def excuse(self, peer_id: str) -> bool:
        """Whether to wait out the server's refusal for our own request rate instead of banning it: it is working
        (it answered), and the excess is ours. Only MAX_WAITS in a row, so that a server that claims it forever is
        banned as any other failing one."""
        count = self.waited.get(peer_id, 0)
        self.waited[peer_id] = count + 1
        return count < MAX_WAITS

    def served(self, peer_id: str) -> None:
        """A request went through: the server's refusals for our rate in a row start over."""
        self.waited.pop(peer_id, None)

    def forgive(self, peer_id: str) -> None:
        """A successful request resets the backoff."""
        self.failures.pop(peer_id, None)
        self.stale.pop(peer_id, None)
        self.served(peer_id)

