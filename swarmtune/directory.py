"""The swarm's read model: from the signed records on the DHT to who serves which blocks of which model.

Clients route over it, servers choose their blocks from it, and `swarm status` prints it. Records
are validated one by one (`swarmtune.records`): a malformed or foreign one is skipped, never fatal.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Protocol

from hivemind.dht.node import DHTNode

from swarmtune import records
from swarmtune.records import ModelInfo, ServerInfo

logger = logging.getLogger(__name__)


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


async def fetch_model_info(dht: DHTNode, prefix: str) -> ModelInfo | None:
    """What most servers say about the model under `prefix` (each server signs its own copy)."""
    entry = await dht.get(prefix, latest=True)
    return _most_common(ModelInfo.from_record(getattr(item, "value", None)) for item in _items(entry))


async def fetch_models(dht: DHTNode) -> dict[str, ModelInfo]:
    """Every model announced on this DHT, by DHT prefix (what most of its servers say about it)."""
    entry = await dht.get(records.MODELS_KEY, latest=True)
    claims: dict[str, list[ModelInfo | None]] = collections.defaultdict(list)
    for item in _items(entry):
        value = getattr(item, "value", None)
        prefix = value.get("prefix") if isinstance(value, dict) else None
        if isinstance(prefix, str):
            claims[prefix].append(ModelInfo.from_record(value))
    models = {prefix: _most_common(found) for prefix, found in claims.items()}
    return {prefix: info for prefix, info in sorted(models.items()) if info is not None}


def _items(entry) -> list:
    return list(entry.value.values()) if entry is not None and hasattr(entry.value, "values") else []


def _most_common(found) -> ModelInfo | None:
    found = [info for info in found if info is not None]
    return collections.Counter(found).most_common(1)[0][0] if found else None


class Exclusions(Protocol):
    """Servers a reader leaves out (the client's bans)."""

    def banned(self, peer_id: str, record_expires: float | None = None) -> bool: ...


@dataclass
class SwarmView:
    """The online servers of one model, by peer id."""

    num_blocks: int
    servers: dict[str, ServerInfo] = field(default_factory=dict)

    def covering(self, block: int, excluded: Exclusions | None = None) -> list[ServerInfo]:
        return [s for s in self.servers.values()
                if s.start <= block < s.end and not (excluded and excluded.banned(s.peer_id, s.expires))]

    def uncovered(self, start: int, end: int, excluded: Exclusions | None = None) -> list[int]:
        return [b for b in range(start, end) if not self.covering(b, excluded)]

    def hosting(self, adapter: str | None) -> SwarmView:
        """Only the servers that host `adapter` (all of them for None)."""
        if adapter is None:
            return self
        return SwarmView(self.num_blocks, {p: s for p, s in self.servers.items() if adapter in s.adapters})


def format_blocks(blocks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0:3, 5": runs of blocks as START:END spans."""
    if not blocks:
        return "?"
    out, first, prev = [], blocks[0], blocks[0]
    for b in blocks[1:] + [None]:
        if b is not None and b == prev + 1:
            prev = b
            continue
        out.append(f"{first}" if first == prev else f"{first}:{prev + 1}")
        if b is not None:
            first = prev = b
    return ", ".join(out)
