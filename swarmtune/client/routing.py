"""Choosing which servers run which blocks: a chain of hops covering [start, end).

Training spreads load: among the servers covering the next block, pick at random weighted by
announced throughput (and by how far the server reaches, since each hop costs a round trip).
Inference minimises latency: a shortest path over block boundaries, where a hop costs the
measured round trip to the server plus its compute time for those blocks. A server not measured
yet is assumed as near as the median measured one: neither favoured nor shunned.
"""

from __future__ import annotations

import heapq
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from swarmtune.client.bans import Bans
from swarmtune.directory import SwarmView, format_blocks
from swarmtune.errors import UserError
from swarmtune.records import ServerInfo

DEFAULT_RTT = 0.05  # seconds, assumed while no server has been measured


class NoServersError(UserError, RuntimeError):
    """Some blocks have no live, unbanned server."""

    def __init__(self, blocks: list[int], model: str = "", adapter: str | None = None):
        self.blocks = blocks
        of = f" of {model}" if model else ""
        hosting = f" with adapter {adapter!r}" if adapter else ""
        super().__init__(f"No live server holds block(s) {format_blocks(blocks)}{of}{hosting}: "
                         f"wait for servers to join or start one with python -m swarmtune.server --blocks ...")


@dataclass(frozen=True)
class Hop:
    server: ServerInfo
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.server.peer_id

    def __str__(self) -> str:
        return f"{self.peer_id[-8:]}[{self.start}:{self.end}]"


def training_route(view: SwarmView, start: int, end: int, bans: Bans | None = None,
                   rng: random.Random | None = None, randomness: float = 1.0) -> list[Hop]:
    rng = rng or random.Random()
    hops, block = [], start
    while block < end:
        candidates = view.covering(block, bans)
        if not candidates:
            raise NoServersError(view.uncovered(block, end, bans))
        scores = [s.throughput * (min(s.end, end) - block) for s in candidates]
        if randomness <= 0:
            server = candidates[max(range(len(candidates)), key=scores.__getitem__)]
        else:
            server = rng.choices(candidates, weights=[x ** (1 / randomness) for x in scores])[0]
        hops.append(Hop(server, block, min(server.end, end)))
        block = hops[-1].end
    return hops


def inference_route(view: SwarmView, start: int, end: int, bans: Bans | None = None,
                    rtt: Callable[[str], float | None] = lambda peer: None) -> list[Hop]:
    """The chain with the least expected time per step (network round trips + compute)."""
    best: dict[int, float] = {start: 0.0}
    back: dict[int, Hop] = {}
    queue = [(0.0, start)]
    servers = [s for s in view.servers.values() if not (bans and bans.banned(s.peer_id, s.expires))]
    measured = {peer: r for peer in view.servers if (r := rtt(peer)) is not None}
    typical = statistics.median(measured.values()) if measured else DEFAULT_RTT
    while queue:
        cost, block = heapq.heappop(queue)
        if block == end:
            break
        if cost > best.get(block, float("inf")):
            continue
        for s in servers:
            if not s.start <= block < s.end:
                continue
            step_time = 1.0 / (s.inference_rps * (s.end - s.start))
            hop_cost = measured.get(s.peer_id, typical)
            for stop in range(block + 1, min(s.end, end) + 1):
                total = cost + hop_cost + step_time * (stop - block)
                if total < best.get(stop, float("inf")):
                    best[stop], back[stop] = total, Hop(s, block, stop)
                    heapq.heappush(queue, (total, stop))
    if end not in best:
        raise NoServersError(view.uncovered(start, end, bans) or [start])
    hops, block = [], end
    while block != start:
        hops.append(back[block])
        block = back[block].start
    return hops[::-1]
