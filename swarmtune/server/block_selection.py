"""Which contiguous span a server should hold: decentralised load balancing over the DHT view.

The swarm is as fast as its weakest block (every request crosses every block), so layouts are
compared by their sorted per-block throughputs, weakest first (a leximin order: raise the
minimum, then the next weakest...). A joining server takes the span that most raises that order.

Serving servers check now and then whether to move. In a small swarm (up to PLAN_MAX_SERVERS)
every server computes the whole swarm's layout from the same view (`plan`): the current layout
improved one server at a time, or a fresh layout placed biggest server first where that beats it
clearly. Readers of the same view reach the same plan, so the servers move together towards one
layout without a coordinator; each goes once the servers staying put keep its blocks served at
half the weakest block's throughput or more while it loads, or where the plan is a leap that
needs a gap, one server at a time (`should_move`). Crashed servers' announcements linger, so
servers of thinly held blocks are pinged first (`suspects`). In a
large swarm one server's move barely shows, so a server moves on its own account: when the
weakest block gets `MIN_GAIN` times faster, or while some blocks have no server (holes), when the
move leaves fewer holes or brings them closer to blocks served twice (a chain of such moves closes
a hole that no single move can).

Pure functions over `ServerInfo` lists: the server and `benchmarks/balance_sim.py` share them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from swarmtune.records import ServerInfo

MIN_GAIN = 1.2          # large swarms: a move must make the weakest block this much faster (hysteresis)
PLAN_GAIN = 1.1         # small swarms: a planned move must raise the leximin order this much
FRESH_GAIN = 1.1        # ... and a fresh layout the weakest block this much over improving the current one
LEAP_GAIN = 1.5         # ... and this much to move a server whose blocks nobody else serves meanwhile
MOVE_DIP = 0.5          # ... and the blocks a moving server leaves keep this much of the weakest block meanwhile
PLAN_MAX_SERVERS = 64   # up to this many servers, each plans the whole swarm's layout
PLAN_ROUNDS = 8         # rounds of one-server improvements when planning (a bound; they stop far sooner)
PROBE_COVERAGE = 3      # servers of blocks held by this many or fewer are checked for life before planning
MAX_PROBES = 16


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


def leximin_gain(new: np.ndarray, old: np.ndarray) -> float:
    """How much faster `new` makes the weakest block where the two sorted orders first differ.

    1.0 when they are the same, below 1 when `new` is worse, infinite when it serves a block that
    `old` leaves unserved. Asking for a gain above 1 is hysteresis that cannot cycle: every move
    taken raises the layout in a strict order.
    """
    a, b = np.sort(old), np.sort(new)
    differ = np.flatnonzero(~np.isclose(a, b, rtol=1e-9, atol=0.0))
    if not len(differ):
        return 1.0
    i = differ[0]
    return math.inf if a[i] == 0 else float(b[i] / a[i])


def plan(servers: Sequence[ServerInfo], num_blocks: int) -> dict[str, int]:
    """The start every server should have, as anyone reading this view computes it.

    Deterministic (servers in peer id order, ties to the lowest start), so that servers planning
    from the same view agree. Servers moving only where the plan gains `PLAN_GAIN` keeps it stable.
    """
    key = tuple(sorted(_Span(s.peer_id, s.start, min(s.end, num_blocks) - s.start, s.throughput) for s in servers))
    return dict(_plan(key, num_blocks))


class _Span(NamedTuple):
    peer_id: str
    start: int
    length: int
    throughput: float


@functools.lru_cache(maxsize=16)  # servers reading an unchanged view (and the simulation's many) plan once
def _plan(spans: tuple[_Span, ...], num_blocks: int) -> tuple[tuple[str, int], ...]:
    kept = _improve(spans, num_blocks, {s.peer_id: s.start for s in spans})
    fresh = _improve(spans, num_blocks, _from_scratch(spans, num_blocks))
    mirrored = {s.peer_id: num_blocks - fresh[s.peer_id] - s.length for s in spans}  # as good, maybe fewer moves
    fresh = min(fresh, mirrored, key=lambda starts: sum(starts[s.peer_id] != s.start for s in spans))
    better = _layout_totals(spans, num_blocks, fresh).min() > FRESH_GAIN * _layout_totals(spans, num_blocks, kept).min()
    return tuple((fresh if better else kept).items())


def should_move(servers: Sequence[ServerInfo], num_blocks: int, me: ServerInfo,
                min_gain: float = MIN_GAIN) -> int | None:
    """A better start for `me` (which may appear in `servers`), or None to stay.

    `servers` are the live ones as far as the caller knows (see `suspects`): online, or loading
    a span they announced ("joining").
    """
    others = [s for s in servers if s.peer_id != me.peer_id]
    me = me if me.end <= num_blocks else dataclasses.replace(me, end=num_blocks)
    if len(others) < PLAN_MAX_SERVERS:
        start = _planned_move(others, num_blocks, me)
        if start is not False:
            return start
    totals, counts = _coverage(others, num_blocks)
    length = me.end - me.start
    if (_place(counts, me.start, length, 1) == 0).any():
        return _fill_holes(counts, me.start, length)
    best = best_start(totals, length, me.throughput)
    current, moved = _place(totals, me.start, length, me.throughput), _place(totals, best, length, me.throughput)
    return best if best != me.start and moved.min() >= min_gain * current.min() else None


def suspects(servers: Sequence[ServerInfo], num_blocks: int) -> list[ServerInfo]:
    """Online servers worth checking for life before planning: those holding blocks few others hold.

    A crashed server's announcement outlives it until it expires; where its blocks have other
    servers that costs little, but a block it held alone (or nearly) is a hole nobody sees.
    """
    counts = _coverage(servers, num_blocks)[1]
    thin = np.concatenate([[0], np.cumsum(counts <= PROBE_COVERAGE)])
    if not thin[-1]:
        return []
    found = [s for s in servers if s.state == "online" and thin[min(s.end, num_blocks)] > thin[s.start]]
    return sorted(found, key=lambda s: counts[s.start:min(s.end, num_blocks)].min())[:MAX_PROBES]


def _planned_move(others: list[ServerInfo], num_blocks: int, me: ServerInfo) -> int | None | bool:
    """`me`'s move in the swarm's plan; None to stay; False where the plan cannot close the holes."""
    servers = [*others, me]
    layout = plan(servers, num_blocks)
    moved = [dataclasses.replace(s, start=layout[s.peer_id], end=layout[s.peer_id] + s.end - s.start) for s in servers]
    planned = block_throughputs(moved, num_blocks)
    if (planned == 0).any():
        return False  # leave it to the chain of hole-closing moves
    target = layout[me.peer_id]
    if target == me.start:
        return None
    # go once the servers staying put (loading ones may fail) keep our blocks served well enough meanwhile;
    # while blocks are unserved anyway, at once; for a leap in throughput, one server at a time
    steady = [s for s in others if s.state == "online" and layout[s.peer_id] == s.start]
    now = block_throughputs(servers, num_blocks)
    if (now == 0).any() or block_throughputs(steady, num_blocks)[me.start:me.end].min() >= MOVE_DIP * now.min():
        return target
    leap = planned.min() >= LEAP_GAIN * now.min()
    first = min(s.peer_id for s in servers if layout[s.peer_id] != s.start) == me.peer_id
    return target if leap and first and all(s.state == "online" for s in others) else None


def _improve(spans: tuple[_Span, ...], num_blocks: int, starts: dict[str, int]) -> dict[str, int]:
    """One server after another moves to its best start where that gains PLAN_GAIN, until none does."""
    starts = dict(starts)
    totals = _layout_totals(spans, num_blocks, starts)
    for _ in range(PLAN_ROUNDS):
        moved = False
        for s in spans:
            start = starts[s.peer_id]
            totals[start:start + s.length] -= s.throughput
            best = best_start(totals, s.length, s.throughput)
            if best != start and leximin_gain(_place(totals, best, s.length, s.throughput),
                                              _place(totals, start, s.length, s.throughput)) >= PLAN_GAIN:
                start, moved = best, True
            starts[s.peer_id] = start
            totals[start:start + s.length] += s.throughput
        if not moved:
            break
    return starts


def _from_scratch(spans: tuple[_Span, ...], num_blocks: int) -> dict[str, int]:
    """Servers placed one by one on an empty swarm, the most capacity (throughput x blocks) first."""
    totals, starts = np.zeros(num_blocks), {}
    for s in sorted(spans, key=lambda s: (-s.throughput * s.length, s.peer_id)):
        start = starts[s.peer_id] = best_start(totals, s.length, s.throughput)
        totals[start:start + s.length] += s.throughput
    return starts


def _layout_totals(spans: Sequence[_Span], num_blocks: int, starts: dict[str, int]) -> np.ndarray:
    totals = np.zeros(num_blocks)
    for s in spans:
        totals[starts[s.peer_id]:starts[s.peer_id] + s.length] += s.throughput
    return totals


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
