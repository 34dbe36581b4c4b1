"""The client's picture of the swarm: which live servers hold which blocks, minus banned ones."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from dataclasses import dataclass, field

from hivemind.dht.node import DHTNode

from swarmtune import records
from swarmtune.records import ServerInfo

logger = logging.getLogger(__name__)


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


async def fetch_swarm(dht: DHTNode, prefix: str, num_blocks: int) -> list[ServerInfo]:
    """Every valid server record of the model's blocks, in any state: per server, its newest one.

    A server that moved still has offline records under its old blocks until they expire; the
    newest record (the latest expiration) is the one that says where it is now.
    """
    keys = [records.block_key(prefix, i) for i in range(num_blocks)]
    found = await dht.get_many(keys, sufficient_expiration_time=float("inf"))
    newest: dict[str, tuple[float, ServerInfo]] = {}
    for key in keys:
        entry = found.get(key)
        if entry is None or not hasattr(entry.value, "items"):
            continue
        for peer_id, item in entry.value.items():
            info = ServerInfo.from_record(peer_id, getattr(item, "value", None))
            if info is None:
                logger.debug(f"ignoring a malformed or foreign record under {key}/{peer_id!r}")
                continue
            expiration = getattr(item, "expiration_time", 0.0)
            if expiration >= newest.get(info.peer_id, (-1.0, None))[0]:
                newest[info.peer_id] = (expiration, info)
    return [dataclasses.replace(info, expires=expiration) for expiration, info in newest.values()]


async def fetch_servers(dht: DHTNode, prefix: str, num_blocks: int) -> dict[str, ServerInfo]:
    """The servers online now, keyed by peer id."""
    return {s.peer_id: s for s in await fetch_swarm(dht, prefix, num_blocks) if s.state == "online"}


async def fetch_model_info(dht: DHTNode, prefix: str) -> records.ModelInfo | None:
    """What most servers say about the model (each server signs its own copy)."""
    entry = await dht.get(prefix, latest=True)
    if entry is None or not hasattr(entry.value, "items"):
        return None
    found = [records.ModelInfo.from_record(getattr(item, "value", None)) for _, item in entry.value.items()]
    found = [info for info in found if info is not None]
    return collections.Counter(found).most_common(1)[0][0] if found else None


@dataclass
class SwarmView:
    num_blocks: int
    servers: dict[str, ServerInfo] = field(default_factory=dict)
    updated: float = 0.0

    def covering(self, block: int, bans: Bans | None = None) -> list[ServerInfo]:
        return [s for s in self.servers.values()
                if s.start <= block < s.end and not (bans and bans.banned(s.peer_id, s.expires))]

    def uncovered(self, start: int, end: int, bans: Bans | None = None) -> list[int]:
        return [b for b in range(start, end) if not self.covering(b, bans)]

    def hosting(self, adapter: str | None) -> SwarmView:
        """Only the servers that host `adapter` (all of them for None)."""
        if adapter is None:
            return self
        servers = {p: s for p, s in self.servers.items() if adapter in s.adapters}
        return SwarmView(self.num_blocks, servers, self.updated)
