"""Which contiguous span a server should hold: decentralised load balancing over the DHT view.

The swarm is as fast as its weakest block (every request crosses every block), so a joining
server takes the span that most raises the sorted per-block throughputs, weakest first (a
leximin order: raise the minimum, then the next weakest...). Serving servers re-check now and
then and move only when that clearly helps: when the weakest block would get `min_gain` times
faster, or, while some blocks have no server at all (holes), when the move leaves fewer holes or
brings them closer to blocks served twice (so a chain of moves can close a hole that no single
move can).

Pure functions over `ServerInfo` lists: the server and `benchmarks/balance_sim.py` share them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from swarmtune.records import ServerInfo

MIN_GAIN = 1.2          # a move must make the weakest block this much faster (hysteresis)


def block_throughputs(servers: Sequence[ServerInfo], num_blocks: int) -> np.ndarray:
    """Per block, the summed throughput of the servers covering it (exactly 0 where none does)."""
    return _coverage(servers, num_blocks)[0]


def choose_best_span(servers: Sequence[ServerInfo], num_blocks: int, my_num_blocks: int, my_throughput: float,
                     rng: random.Random | None = None) -> int:
    """The start of the span whose addition leaves the best sorted per-block throughputs.

    Ties (an empty swarm, identical servers) go to the lowest start, or a random one with `rng`,
    so servers joining at the same moment spread out.
    """
    return best_start(block_throughputs(servers, num_blocks), my_num_blocks, my_throughput, rng)


def best_start(totals: np.ndarray, length: int, throughput: float, rng: random.Random | None = None) -> int:
    """`choose_best_span` over precomputed per-block throughputs of the other servers."""
    placed = totals + throughput * _windows(len(totals), length)
    ranked = np.sort(placed, axis=1)
    order = np.lexsort(ranked.T[::-1])  # lexsort's last key is the primary one: the weakest block
    ties = np.flatnonzero((ranked == ranked[order[-1]]).all(axis=1))
    return int(rng.choice(ties) if rng is not None else ties[0])


def should_move(servers: Sequence[ServerInfo], num_blocks: int, me: ServerInfo,
                min_gain: float = MIN_GAIN) -> int | None:
    """A better start for `me` (which may appear in `servers`), or None to stay.

    Evaluated with `me` taken out of the swarm, so a server never counts its own blocks twice.
    """
    others = [s for s in servers if s.peer_id != me.peer_id]
    totals, counts = _coverage(others, num_blocks)
    length = min(me.end, num_blocks) - me.start
    if (_place(counts, me.start, length, 1) == 0).any():
        return _fill_holes(counts, me.start, length)
    best = best_start(totals, length, me.throughput)
    current, moved = _place(totals, me.start, length, me.throughput), _place(totals, best, length, me.throughput)
    return best if best != me.start and moved.min() >= min_gain * current.min() else None


def _fill_holes(counts: np.ndarray, start: int, length: int) -> int | None:
    """The start leaving the fewest holes, then the holes nearest to spare coverage, if that beats staying.

    When no single move closes a hole, the spare coverage (blocks held twice) may be far from it:
    then the servers between them shift one after another, each bringing hole and spare closer,
    until one move closes the hole. Every such step strictly lowers (holes, distance), so the
    servers cannot move in circles.
    """
    placed = counts + _windows(len(counts), length)
    holes = placed == 0
    spare = placed >= 2
    index = np.arange(len(counts))
    gaps = np.abs(index[:, None] - index[None, :])
    nearest = np.where(spare[:, None, :], gaps[None], np.inf).min(axis=2)
    distance = np.where(holes, nearest, 0.0).sum(axis=1)
    order = np.lexsort((distance, holes.sum(axis=1)))
    best = int(order[0])
    better = (holes[best].sum(), distance[best]) < (holes[start].sum(), distance[start])
    return best if better else None


def _coverage(servers: Sequence[ServerInfo], num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block: summed throughput (exactly 0 where no server is) and number of servers."""
    deltas, counts = np.zeros(num_blocks + 1), np.zeros(num_blocks + 1, dtype=np.int64)
    if servers:
        starts = np.array([min(s.start, num_blocks) for s in servers])
        ends = np.array([min(s.end, num_blocks) for s in servers])
        rates = np.array([s.throughput for s in servers], dtype=float)
        np.add.at(deltas, starts, rates)
        np.add.at(deltas, ends, -rates)
        np.add.at(counts, starts, 1)
        np.add.at(counts, ends, -1)
    counts = np.cumsum(counts[:-1])
    return np.where(counts > 0, np.cumsum(deltas[:-1]), 0.0), counts


def _windows(num_blocks: int, length: int) -> np.ndarray:
    """Row s: which blocks a span of `length` starting at s covers."""
    length = min(length, num_blocks)
    index = np.arange(num_blocks)
    starts = np.arange(num_blocks - length + 1)[:, None]
    return (index >= starts) & (index < starts + length)


def _place(values: np.ndarray, start: int, length: int, amount: float) -> np.ndarray:
    out = values.copy()
    out[start:start + length] += amount
    return out
