"""The swarm's read model: from the signed records on the DHT to who serves which blocks of which model.

Clients route over it, servers choose their blocks from it, and `swarm status` prints it. Records
are validated one by one (`swarmtune.records`): a malformed or foreign one is skipped, never fatal.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import random
from dataclasses import dataclass, field
from typing import Protocol

from hivemind.dht.node import DHTNode

from swarmtune import records, transport, wire
from swarmtune.records import ModelInfo, ServerInfo

logger = logging.getLogger(__name__)
PING_TIMEOUT = 5.0     # a claimant's server that does not answer within this is taken for a fake
PINGED_PER_CLAIM = 8   # signers of one claim pinged at most, at random
MAX_PINGED = 64        # signers pinged in all: one of each claim in turn (so 64 distinct claims get one each)


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


async def fetch_unreachable(dht: DHTNode, prefix: str) -> frozenset[str]:
    """The peers some server of the model reports announced but not answering (`records.unreachable_key`)."""
    entry = await dht.get(records.unreachable_key(prefix), latest=True)
    return frozenset().union(*(records.reported_peers(value) for _, value in _items(entry)))


async def fetch_model_info(dht: DHTNode, prefix: str) -> ModelInfo | None:
    """What the model under `prefix` is, from what its servers say (each signs its own claim)."""
    entry = await dht.get(prefix, latest=True)
    return await settle_claims(dht, prefix, {peer: ModelInfo.from_record(value) for peer, value in _items(entry)})


async def fetch_models(dht: DHTNode) -> dict[str, ModelInfo]:
    """Every model announced on this DHT, by DHT prefix."""
    entry = await dht.get(records.MODELS_KEY, latest=True)
    claims: dict[str, dict[str, ModelInfo | None]] = collections.defaultdict(dict)
    for peer, value in _items(entry):
        prefix = value.get("prefix") if isinstance(value, dict) else None
        if isinstance(prefix, str):
            claims[prefix][peer] = ModelInfo.from_record(value)
    models = {prefix: await settle_claims(dht, prefix, found) for prefix, found in sorted(claims.items())}
    return {prefix: info for prefix, info in models.items() if info is not None}


async def settle_claims(dht: DHTNode, prefix: str, claims: dict[str, ModelInfo | None]) -> ModelInfo | None:
    """The claim to believe, by signer. Anyone can sign a claim, and a server record too, so when claims
    disagree, what counts is how many of each claim's signers are servers that answer (`reachable_backers`).
    Only where none answers: the most common claim of peers with an online server record, then of all. A
    reader that has the checkpoint trusts its config instead."""
    claims = {peer: info for peer, info in claims.items() if info is not None}
    if len(set(claims.values())) <= 1:
        return next(iter(claims.values()), None)
    answering = await reachable_backers(dht.p2p, claims)
    if any(answering.values()):
        return max(answering, key=answering.__getitem__)
    servers = await fetch_servers(dht, prefix, max(info.num_blocks for info in claims.values()))
    backed = [info for peer, info in claims.items() if peer in servers]
    return _most_common(backed or claims.values())


async def reachable_backers(p2p, claims: dict[str, ModelInfo]) -> dict[ModelInfo, int]:
    """Per distinct claim, how many of (up to PINGED_PER_CLAIM of) its signers answer a server's info call (a
    refusal is an answer; a client or a bare DHT node has no such call). Signed records cost their signer a
    signature each; answering costs a live server each."""
    by_claim: dict[ModelInfo, list[str]] = collections.defaultdict(list)
    for peer in random.sample(list(claims), len(claims)):
        by_claim[claims[peer]].append(peer)
    rounds = zip(*(itertools.chain(signers[:PINGED_PER_CLAIM], itertools.repeat(None)) for signers in
                   random.sample(list(by_claim.values()), len(by_claim))))  # a signer of each claim in turn
    pinged = list(itertools.islice(((claims[peer], peer) for peers in itertools.islice(rounds, PINGED_PER_CLAIM)
                                    for peer in peers if peer is not None), MAX_PINGED))

    async def answers(peer: str) -> bool:
        try:
            await transport.call(p2p, peer, "info", wire.pack({}), PING_TIMEOUT)
        except transport.ServerRejected:
            return True
        except transport.ServerFailure:
            return False
        return True

    alive = await asyncio.gather(*(answers(peer) for _, peer in pinged))
    counts = dict.fromkeys(by_claim, 0)
    for (info, _), ok in zip(pinged, alive):
        counts[info] += ok
    return counts


def _items(entry) -> list[tuple[str, object]]:
    """(subkey, value) of a dictionary record: the subkey is the signer's peer id."""
    if entry is None or not hasattr(entry.value, "items"):
        return []
    return [(str(key), getattr(item, "value", None)) for key, item in entry.value.items()]


def _most_common(found) -> ModelInfo | None:
    found = list(found)
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
