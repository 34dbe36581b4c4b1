"""Servers a client stopped trusting for a while: each failure bans its server for longer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Bans:
    """Servers that failed recently, each banned for an exponentially growing time."""

    base: float = 2.0
    max: float = 300.0
    until: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    stale: dict[str, float] = field(default_factory=dict)  # peer -> expiry of the record it failed under

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

    def forgive(self, peer_id: str) -> None:
        """A successful request resets the backoff."""
        self.failures.pop(peer_id, None)
        self.stale.pop(peer_id, None)

