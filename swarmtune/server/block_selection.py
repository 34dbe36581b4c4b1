"""Which contiguous span a server should hold: decentralised load balancing over the DHT view.

The swarm is as fast as its weakest block (every request crosses every block), so a joining
server takes the span that most raises the sorted per-block throughputs, weakest first (a
leximin order: raise the minimum, then the next weakest...). Serving servers re-check now and
then and move only when that clearly helps: when the weakest block would get `min_gain` times
faster, or when it would close holes (blocks nobody serves). Closing holes can need a chain of
moves (one server frees a place another must fill), so with holes the check also simulates the
other servers' reactions before deciding.

Pure functions over `ServerInfo` lists: the server and `benchmarks/balance_sim.py` share them.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np

from swarmtune.records import ServerInfo

MIN_GAIN = 1.2          # a move must make the weakest block this much faster (hysteresis)
CASCADE_ROUNDS = 2      # passes over the other servers when simulating reactions to a move


def block_throughputs(servers: Sequence[ServerInfo], num_blocks: int) -> np.ndarray:
    """Per block, the summed throughput of the servers covering it."""
    deltas = np.zeros(num_blocks + 1)
    if servers:
        starts = np.array([min(s.start, num_blocks) for s in servers])
        ends = np.array([min(s.end, num_blocks) for s in servers])
        rates = np.array([s.throughput for s in servers], dtype=float)
        np.add.at(deltas, starts, rates)
        np.add.at(deltas, ends, -rates)
    return np.cumsum(deltas[:-1])


def choose_best_span(servers: Sequence[ServerInfo], num_blocks: int, my_num_blocks: int, my_throughput: float,
                     rng: random.Random | None = None) -> int:
    """The start of the span whose addition leaves the best sorted per-block throughputs.

    Ties (an empty swarm, identical servers) go to the lowest start, or a random one with `rng`,
    so servers joining at the same moment spread out.
    """
    return best_start(block_throughputs(servers, num_blocks), my_num_blocks, my_throughput, rng)


def best_start(totals: np.ndarray, length: int, throughput: float, rng: random.Random | None = None) -> int:
    """`choose_best_span` over precomputed per-block throughputs (without the placed server)."""
    starts = _candidates(totals, length, throughput)
    ranked = np.sort(starts, axis=1)
    order = np.lexsort(ranked.T[::-1])  # the last key is the primary one: the weakest block
    ties = np.flatnonzero((ranked == ranked[order[-1]]).all(axis=1))
    return int(rng.choice(ties) if rng is not None else ties[0])


def should_move(servers: Sequence[ServerInfo], num_blocks: int, me: ServerInfo,
                min_gain: float = MIN_GAIN) -> int | None:
    """A better start for `me` (which may appear in `servers`), or None to stay.

    Evaluated with `me` taken out of the swarm, so a server never counts its own blocks twice.
    """
    others = [s for s in servers if s.peer_id != me.peer_id]
    totals = block_throughputs(others, num_blocks)
    length = min(me.end - me.start, num_blocks)
    current = _place(totals, me.start, length, me.throughput)
    start = best_start(totals, length, me.throughput)
    if start != me.start and _improves(current, _place(totals, start, length, me.throughput), min_gain):
        return start
    if not (current == 0).any():
        return None
    return _close_holes(others, num_blocks, me, current, length)


def _close_holes(others: list[ServerInfo], num_blocks: int, me: ServerInfo, current: np.ndarray,
                 length: int) -> int | None:
    """The start covering a hole whose chain of follow-up moves leaves the fewest holes, if any helps."""
    holes = np.flatnonzero(current == 0)
    starts = {s for h in holes for s in range(max(0, h - length + 1), min(h, num_blocks - length) + 1)}
    best, best_holes = None, int((current == 0).sum())
    for start in sorted(starts - {me.start}):
        moved = dataclasses.replace(me, start=start, end=start + length)
        left = int((_react(others, moved, num_blocks) == 0).sum())
        if left < best_holes:
            best, best_holes = start, left
    return best


def _react(others: list[ServerInfo], me: ServerInfo, num_blocks: int) -> np.ndarray:
    """Per-block throughputs after the other servers respond to `me` with their own should_move."""
    swarm = {s.peer_id: s for s in others} | {me.peer_id: me}
    for _ in range(CASCADE_ROUNDS):
        changed = False
        for server in others:
            current = swarm[server.peer_id]
            start = _single_move(list(swarm.values()), num_blocks, current)
            if start is not None:
                swarm[server.peer_id] = dataclasses.replace(current, start=start, end=start + current.end - current.start)
                changed = True
        if not changed:
            break
    return block_throughputs(list(swarm.values()), num_blocks)


def _single_move(servers: list[ServerInfo], num_blocks: int, me: ServerInfo) -> int | None:
    totals = block_throughputs([s for s in servers if s.peer_id != me.peer_id], num_blocks)
    length = me.end - me.start
    start = best_start(totals, length, me.throughput)
    current = _place(totals, me.start, length, me.throughput)
    return start if start != me.start and _improves(current, _place(totals, start, length, me.throughput),
                                                     MIN_GAIN) else None


def _improves(current: np.ndarray, moved: np.ndarray, min_gain: float) -> bool:
    holes_now, holes_after = int((current == 0).sum()), int((moved == 0).sum())
    if holes_now or holes_after:
        return holes_after < holes_now
    return moved.min() >= min_gain * current.min()


def _place(totals: np.ndarray, start: int, length: int, throughput: float) -> np.ndarray:
    out = totals.copy()
    out[start:start + length] += throughput
    return out


def _candidates(totals: np.ndarray, length: int, throughput: float) -> np.ndarray:
    """Row s: the per-block throughputs with the server placed at start s."""
    n = len(totals)
    length = min(length, n)
    index = np.arange(n)
    starts = np.arange(n - length + 1)[:, None]
    return totals + throughput * ((index >= starts) & (index < starts + length))
