"""Which contiguous span a server should hold: decentralised load balancing over the DHT view.

The swarm is as fast as its weakest block (every request crosses every block), so layouts are
compared by their sorted per-block throughputs, weakest first (a leximin order: raise the
minimum, then the next weakest...). A joining server takes the span that most raises that order.

Serving servers check now and then whether to move. In a small swarm (up to PLAN_MAX_SERVERS) every
server computes the whole swarm's layout from the same view (`plan`), and a joining server takes its
place in that plan. The candidates are the current layout improved one server at a time, the k most
redundant servers taken out and placed again (for every k), a fresh layout, and the current one with
its holes filled by a few servers, a wide hole shared by up to COVER_PARTS so that it loads sooner
(`_cover`); servers whose span was given (pinned) stay put. Moves are not free: a moving server
keeps serving the blocks its old and new spans share, but the others only as it loads them
(`load_order`), so each candidate is valued by what the swarm serves over the next HORIZON_S, the
dips while its servers move included, less a cost for each second some block goes unserved and for
each server that moves; the best is taken where it beats staying by MOVE_GAIN. Servers move in waves
that keep every block served (`_waves`); readers of the same view agree on the plan and on who goes
now, so the swarm moves towards one layout without a coordinator. Crashed servers' announcements
linger, so servers of thinly held blocks (in a swarm of up to MAX_PROBES, all servers) are pinged
first, and those another server reported unreachable (`suspects`). Servers that plan from views a
moment apart can still claim the same gap: once its claim is announced, a server reads the others'
and gives way where another claimed its gap too (`back_off`).

In a large swarm one server's move barely shows, so a server moves on its own account: when the
weakest block gets `MIN_GAIN` times faster, or while some blocks have no server (holes), when the
move leaves fewer holes or brings them closer to blocks served twice (a chain of such moves closes
a hole that no single move can).

Where a model's blocks differ in size (`sizes`: DeepSeek-V3's dense first blocks take 1/20 of an MoE
block's memory), a server's capacity is memory, and its span at a start holds as many blocks as fit
(`span_ends`); with blocks alike, a span's length is fixed, as it always was.

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
PLAN_GAIN = 1.1         # small swarms: improving a layout, each server's move must raise the leximin order this much
HORIZON_S = 600.0       # ... a new layout must serve MOVE_GAIN times what staying does over this long,
MOVE_GAIN = 1.03        #     counting the weakest block over time, with the dips while servers move;
KEEP = 0.97             # ... servers move in waves that keep every served block this share of the weakest
UNSERVED_COST = 5.0     # ... each second some block is unserved costs this many of the best layout's weakest block,
MOVE_COST_S = 1.0       #     and each server that moves this many (sessions on the blocks it drops start again)
MOVE_S, LOAD_S_PER_BLOCK = 2.0, 2.0  # a move's load time, estimated (only its ratio to HORIZON_S matters)
PLAN_MAX_SERVERS = 64   # up to this many servers, each plans the whole swarm's layout
PLAN_ROUNDS = 8         # rounds of one-server improvements when planning (a bound; they stop far sooner)
PROBE_COVERAGE = 3      # servers of blocks held by this many or fewer are checked for life before planning
MAX_PROBES = 16
COVER_PARTS = 3         # a hole may be shared by up to this many servers, loading its parts at once,
COVER_MIN_SHARE = 3     # ... each taking at least this many of its blocks
BACK_OFF_ROUNDS = 3     # a mover that gave way reads the others' claims again, up to this many reads in all


def block_throughputs(servers: Sequence[ServerInfo], num_blocks: int) -> np.ndarray:
    """Per block, the summed throughput of the servers holding it, loaded or not (exactly 0 where none does)."""
    return _coverage(servers, num_blocks)[0]


def served_throughputs(servers: Sequence[ServerInfo], num_blocks: int) -> np.ndarray:
    """Per block, the summed throughput of the online servers serving it now: what clients can use."""
    return _coverage([dataclasses.replace(s, target=None) for s in servers if s.state == "online"], num_blocks)[0]


def choose_best_span(servers: Sequence[ServerInfo], num_blocks: int, capacity: float, my_throughput: float,
                     rng: random.Random | None = None, sizes: Sequence[float] | None = None) -> int:
    """The start of the span whose addition leaves the best sorted per-block throughputs.

    `capacity`: how many blocks the server holds, or with `sizes` (each block's memory relative to
    the largest) how many of the largest its memory holds (`span_ends`). Ties (an empty swarm,
    identical servers) go to the lowest start, or a random one with `rng`, so servers joining at
    the same moment spread out.
    """
    return best_start(block_throughputs(servers, num_blocks), capacity, my_throughput, rng, sizes)


def join_start(servers: Sequence[ServerInfo], num_blocks: int, me: ServerInfo, rng: random.Random | None = None,
               sizes: Sequence[float] | None = None) -> int:
    """Where a joining server `me` (its span's length, or with `sizes` its capacity, and throughput) goes.

    In a small swarm, its place in the swarm's plan with it added: the servers already there then
    move (if they must) while it loads, rather than after.
    """
    others = [s for s in servers if s.peer_id != me.peer_id]
    sizes = relative_sizes(sizes)
    ends = span_ends(_capacity(me, num_blocks, sizes), num_blocks, sizes)
    start = _best(block_throughputs(others, num_blocks), _rows(num_blocks, ends), me.throughput, rng)
    if len(others) >= PLAN_MAX_SERVERS:
        return start
    me = dataclasses.replace(me, start=start, end=ends[start], state="joining")
    return plan([*others, me], num_blocks, sizes)[me.peer_id]


def best_start(totals: np.ndarray, capacity: float, throughput: float, rng: random.Random | None = None,
               sizes: Sequence[float] | None = None) -> int:
    """`choose_best_span` over precomputed per-block throughputs of the other servers."""
    return _best(totals, _rows(len(totals), span_ends(capacity, len(totals), relative_sizes(sizes))), throughput, rng)


def _best(totals: np.ndarray, rows: np.ndarray, throughput: float, rng: random.Random | None = None) -> int:
    """The start of the best of the spans in `rows` (row s: the blocks of the span at s) added to `totals`."""
    ranked, best = _leximin_best(totals + throughput * rows)
    ties = np.flatnonzero((ranked == ranked[best]).all(axis=1))
    return int(rng.choice(ties) if rng is not None else ties[0])


def relative_sizes(sizes: Sequence[float] | None) -> tuple[float, ...] | None:
    """Each block's memory over the largest's; None where they are all alike (every span then has a fixed length)."""
    if sizes is None or min(sizes) == max(sizes):
        return None
    largest = max(sizes)
    return tuple(float(size) / largest for size in sizes)


@functools.lru_cache(maxsize=1024)  # per server in view, at every plan
def span_ends(capacity: float, num_blocks: int, sizes: tuple[float, ...] | None = None) -> tuple[int, ...]:
    """Per start a server may take (from 0), the end of its span there: as many blocks as `capacity` holds.

    Without `sizes` (`relative_sizes`), `capacity` is a number of blocks; with them, memory in
    units of the largest block, so that a span over smaller blocks holds more of them. The starts
    run up to the first whose span reaches the last block (a later one would hold less of it).
    """
    if sizes is None:
        length = min(int(capacity), num_blocks)
        return tuple(range(length, num_blocks + 1))
    prefix = np.concatenate([[0.0], np.cumsum(sizes)])
    ends = np.searchsorted(prefix, prefix[:-1] + capacity + 1e-9 * max(1.0, capacity), side="right") - 1
    last = int(np.argmax(ends >= num_blocks)) if (ends >= num_blocks).any() else num_blocks - 1
    return tuple(int(end) for end in np.minimum(ends[:last + 1], num_blocks))


def span_end(capacity: float, start: int, num_blocks: int, sizes: tuple[float, ...] | None = None) -> int:
    """The end of the span of a server with `capacity` at `start` (`span_ends`; past the last start, the model's)."""
    ends = span_ends(capacity, num_blocks, sizes)
    return ends[start] if start < len(ends) else num_blocks


def _capacity(s: ServerInfo, num_blocks: int, sizes: tuple[float, ...] | None) -> float:
    """What `span_ends` takes for `s`: its span's length, or with `sizes` its announced capacity (a record
    without one: what its span holds)."""
    start, end = s.whole_span
    end = min(end, num_blocks)
    if sizes is None:
        return end - start
    return s.capacity or float(sum(sizes[start:end]))


def _leximin_best(rows: np.ndarray) -> tuple[np.ndarray, int]:
    """Each row sorted, and the index of the row that is best in the leximin order (the last of equals)."""
    ranked = np.sort(rows, axis=1)
    return ranked, int(np.lexsort(ranked.T[::-1])[-1])  # lexsort's last key is the primary one: the weakest block


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


def plan(servers: Sequence[ServerInfo], num_blocks: int, sizes: Sequence[float] | None = None) -> dict[str, int]:
    """The start every server should have, as anyone reading this view computes it.

    Deterministic (servers in peer id order, ties to the lowest start), so that servers planning
    from the same view agree. With `sizes` (each block's memory), a server's span at a start is
    as many blocks as its capacity holds there (`span_ends`).
    """
    return dict(_plan(_spans(servers, num_blocks, relative_sizes(sizes)), num_blocks)[0])


class _Span(NamedTuple):
    peer_id: str
    start: int          # the whole span it holds, loaded or not
    length: int
    throughput: float
    served: range       # the blocks it serves now (empty while it loads its first)
    pinned: bool        # never moves
    ends: tuple[int, ...]  # per start it may take, where its span there ends (`span_ends`)
    capacity: float     # its length, or with block sizes, its memory for blocks (`_capacity`)

    @property
    def loading(self) -> bool:
        return len(self.served) < self.length

    def length_at(self, start: int) -> int:
        return self.length if start == self.start else self.ends[start] - start

    def rows(self, num_blocks: int) -> np.ndarray:
        return _rows(num_blocks, self.ends)


def layout(servers: Sequence[ServerInfo]) -> frozenset[tuple]:
    """Who holds which span, at what throughput, and whether it has loaded it all.

    Where this changed (a server joined, moved, left or finished loading), the best plan may have
    too; a change of how far a load has got alone is left to the periodic checks.
    """
    return frozenset((s.peer_id, s.whole_span, s.throughput, s.pinned, s.state == "online" and s.target is None)
                     for s in servers)


def _spans(servers: Sequence[ServerInfo], num_blocks: int,
           sizes: tuple[float, ...] | None = None) -> tuple[_Span, ...]:
    spans = []
    for s in servers:
        start, end = s.whole_span
        served = range(s.start, min(s.end, num_blocks)) if s.state == "online" else range(0)
        capacity = _capacity(s, num_blocks, sizes)
        spans.append(_Span(s.peer_id, start, min(end, num_blocks) - start, s.throughput, served, s.pinned,
                           span_ends(capacity, num_blocks, sizes), capacity))
    return tuple(sorted(spans))


@functools.lru_cache(maxsize=16)  # servers reading an unchanged view (and the simulation's many) plan once
def _plan(spans: tuple[_Span, ...], num_blocks: int) -> tuple[tuple[tuple[str, int], ...], frozenset[str]]:
    """The layout to move to, and the servers that go now.

    The candidates: the current layout improved one server at a time; the most redundant k servers
    taken out and placed again, for every k; a fresh layout, and its mirror image; the current
    layout with its holes filled, each by one server or shared by up to COVER_PARTS (`_cover`).
    Pinned servers stay where they are in all of them. Each is valued by what it serves over
    HORIZON_S, its moves included (`_waves`, `_value`); the best (of equals, the one moving fewer
    servers) is taken where it beats staying by MOVE_GAIN. The servers of its first wave go now,
    unless that wave is deep and a server is loading: it may be about to serve.
    """
    current = {s.peer_id: s.start for s in spans}
    movable = [s for s in spans if not s.pinned]
    fresh = _reinsert(spans, num_blocks, current, movable)
    mirrored = {s.peer_id: s.start if s.pinned else _mirrored(s, fresh[s.peer_id], num_blocks)
                for s in spans}  # without pinned servers (blocks alike) as good as `fresh`, maybe with fewer moves
    order = _removal_order(spans, num_blocks, current)
    candidates = [_improve(spans, num_blocks, current), fresh, mirrored]
    candidates += [_cover(spans, num_blocks, current, parts) for parts in range(1, COVER_PARTS + 1)]
    candidates += [_reinsert(spans, num_blocks, current, order[:k]) for k in range(1, len(order))]
    candidates = list({frozenset(c.items()): c for c in candidates}.values())  # each once (the first of equals wins)
    waves = [_waves(spans, num_blocks, starts) for starts in candidates]
    finals = [_layout_totals(spans, num_blocks, starts).min() for starts in [current, *candidates]]
    unit = max(finals)  # the weakest block of the best layout in view
    values = [_value(final, *moving, unit) for final, moving in zip(finals[1:], waves)]
    moves = [sum(starts[s.peer_id] != s.start for s in spans) for starts in candidates]
    best = max(range(len(candidates)), key=lambda i: (values[i], -moves[i], -i))
    staying = _value(finals[0], *_waves(spans, num_blocks, current), unit)
    if values[best] - staying <= (MOVE_GAIN - 1) * abs(staying):  # (negative while blocks go unserved)
        return tuple(current.items()), frozenset()
    wave, _, _, deep = waves[best][0][0]
    waiting = deep and any(s.loading for s in spans)  # a deep wave waits for the servers loading now
    return tuple(candidates[best].items()), frozenset() if waiting else frozenset(s.peer_id for s in wave)


def _mirrored(s: _Span, start: int, num_blocks: int) -> int:
    """The start of `s`'s span at `start` mirrored about the model's middle (or the last start it may take)."""
    return min(num_blocks - start - s.length_at(start), len(s.ends) - 1)


def _value(final: float, waves: list, unserved_s: float, unit: float) -> float:
    """What a layout serves over HORIZON_S from now: its weakest block (`final`), less the dips while its
    movers load (in `waves`, see `_waves`). Less, in seconds of `unit` (the weakest block of the best layout
    in view): UNSERVED_COST for each second some block is unserved (`unserved_s`), as the requests and
    sessions crossing it fail; and MOVE_COST_S for each server that moves."""
    value = sum(during * load for _, during, load, _ in waves) + final * max(0.0, HORIZON_S - sum(w[2] for w in waves))
    return value - unit * (UNSERVED_COST * unserved_s + MOVE_COST_S * sum(len(wave) for wave, *_ in waves))


def _waves(spans: tuple[_Span, ...], num_blocks: int,
           starts: dict[str, int]) -> tuple[list[tuple[list[_Span], float, float, bool]], float]:
    """How the servers that move to `starts` go: in waves, each (servers, weakest served block meanwhile, seconds,
    deep); and the seconds some block is unserved meanwhile (`_unserved_seconds`).

    A moving server keeps serving the blocks its old and new spans share, and stops serving the
    others while it loads the new ones (`load_order`). Where blocks are unserved, the movers that
    will serve them go first: those whose going leaves no other block unserved, or where each
    would, all of them at once; the others stay meanwhile. Then a wave takes, in
    peer id order, the movers whose going leaves every served block KEEP of the weakest (blocks
    only loading servers hold are not served anyway, and counting them would let waves planned
    from views taken mid-move dip further and further); where none can, the one whose going
    leaves the most goes alone (a deep wave).
    """
    movers = [s for s in spans if starts[s.peer_id] != s.start]
    at = {s.peer_id: s.start for s in spans}
    serving = _served_totals(spans, num_blocks)
    unserved = _layout_totals(spans, num_blocks, at) == 0  # nobody serves or loads these blocks
    loaded_anyway = (serving == 0) & ~unserved  # unserved now, loading: alike in every plan
    waves, gaps, loading = [], [], [s for s in spans if s.loading]  # gaps: what each wave leaves served
    while movers:
        served = serving > 0  # blocks only loading servers hold are left out: they are not served yet anyway
        floor = KEEP * serving[served].min() if served.any() else 0.0
        wave, deep = [], False
        fillers = [s for s in movers if unserved[_span_at(s, starts[s.peer_id])].any()]
        if fillers and not waves:  # first, the servers that serve unserved blocks, those leaving no new ones
            for s in fillers:
                without = _leaving(serving, s, starts[s.peer_id])
                if without[served].all():
                    wave.append(s)
                    serving = without
            if not wave:  # ... or where each would, all at once
                for s in fillers:
                    wave.append(s)
                    serving = _leaving(serving, s, starts[s.peer_id])
        else:
            for s in movers:
                without = _leaving(serving, s, starts[s.peer_id])
                if without[served].min(initial=np.inf) >= floor:  # initial: with no block served, any move is fine
                    wave.append(s)
                    serving = without
        if not wave:
            deep = True
            left = [_leaving(serving, s, starts[s.peer_id]) for s in movers]
            wave = [movers[int(np.argmax([t.min() for t in left]))]]
            serving = left[movers.index(wave[0])]
        seconds = max(MOVE_S + LOAD_S_PER_BLOCK * (s.length_at(starts[s.peer_id]) - len(_kept(s, starts[s.peer_id])))
                      for s in wave)
        gaps.append(serving.copy())
        if not waves:  # the servers loading now are done by the time the first wave is
            loading = [s for s in loading if s not in wave]
            positive = serving[serving > 0]  # the weakest served block: unserved ones count in `_unserved_seconds`
            waves.append((wave, float(positive.min()) if len(positive) else 0.0, seconds, deep))
            serving = serving + _layout_totals(loading, num_blocks, at) - _served_totals(loading, num_blocks)
        else:
            waves.append((wave, float(serving.min()), seconds, deep))
        for s in wave:
            start, kept = starts[s.peer_id], _kept(s, starts[s.peer_id])
            serving[start:start + s.length_at(start)] += s.throughput
            serving[kept.start:kept.stop] -= s.throughput  # served all along
        serving = _settled(serving)
        movers = [s for s in movers if s not in wave]
    return waves, _unserved_seconds(gaps or [serving], waves, loading, starts, loaded_anyway)


def _unserved_seconds(gaps: list[np.ndarray], waves: list, loading: list[_Span], starts: dict[str, int],
                      loaded_anyway: np.ndarray) -> float:
    """Seconds some block is unserved while the servers move: in each wave, until the movers so far and the
    servers `loading` now have loaded every block unserved in its `gaps` (what is served meanwhile), each in
    `load_order` (a hole that another mover of its wave loads comes later); HORIZON_S where none will. Blocks
    `loaded_anyway` do not count."""
    ready, began, total = np.full(len(gaps[0]), HORIZON_S), [0.0], 0.0
    for _, _, seconds, _ in waves:
        began.append(began[-1] + seconds)
    goes = [(s, s.start, 0.0, gaps[0]) for s in loading]
    for k, (wave, *_) in enumerate(waves):  # each mover sees the others of its wave loading (`anticipated_throughputs`)
        ahead = gaps[k] + 0.5 * _layout_totals(wave, len(gaps[k]), starts)
        goes += [(s, starts[s.peer_id], began[k] + MOVE_S, ahead) for s in wave]
    for s, start, loads_from, serving in goes:
        for i, block in enumerate(load_order(serving, start, s.length_at(start), _kept(s, start)), 1):
            ready[block] = min(ready[block], loads_from + LOAD_S_PER_BLOCK * i)
    for serving, since in zip(gaps, began):
        unserved = (serving == 0) & ~loaded_anyway
        total += max(0.0, float(ready[unserved].max()) - since) if unserved.any() else 0.0
    return min(total, HORIZON_S)


def kept_blocks(served: range, start: int, length: int) -> range:
    """The blocks of `served` that a server moving to [start, start + length) keeps serving (maybe none)."""
    return range(max(served.start, start), max(served.start, min(served.stop, start + length)))


def _span_at(s: _Span, start: int) -> slice:
    return slice(start, start + s.length_at(start))


def _kept(s: _Span, start: int) -> range:
    """The blocks `s` keeps serving as it moves to `start`."""
    return kept_blocks(s.served, start, s.length_at(start))


def _leaving(serving: np.ndarray, s: _Span, start: int) -> np.ndarray:
    """`serving` (per-block throughputs) once `s` stops serving what it will not keep at `start`."""
    out = serving.copy()
    kept = _kept(s, start)
    out[s.served.start:s.served.stop] -= s.throughput
    out[kept.start:kept.stop] += s.throughput
    return _settled(out)


def anticipated_throughputs(servers: Sequence[ServerInfo], num_blocks: int) -> np.ndarray:
    """Per block, what online servers serve now plus half of what servers loading it will add.

    What a server about to load orders its blocks by (`load_order`): a hole that another server is
    already loading comes after one that nobody is.
    """
    served = served_throughputs(servers, num_blocks)
    return served + 0.5 * (block_throughputs(servers, num_blocks) - served)


def load_order(totals: np.ndarray, start: int, length: int, kept: range = range(0)) -> list[int]:
    """The order in which a server loads the blocks of its span [start, start + length) that it lacks.

    It serves each block as soon as it is loaded, so the order matters: outward from the blocks it
    keeps, or with none from the weakest in `totals` (see `anticipated_throughputs`), each next the
    weaker of the two neighbours. Holes are served first, and what the server serves stays
    contiguous (one span to announce).
    """
    if len(kept):
        lo, hi, order = kept.start, kept.stop, []
    else:
        first = start + int(np.argmin(totals[start:start + length]))
        lo, hi, order = first, first + 1, [first]
    while hi - lo < length:
        left = totals[lo - 1] if lo > start else math.inf
        right = totals[hi] if hi < start + length else math.inf
        if left < right:
            lo -= 1
            order.append(lo)
        else:
            order.append(hi)
            hi += 1
    return order


def _removal_order(spans: tuple[_Span, ...], num_blocks: int, starts: dict[str, int]) -> list[_Span]:
    """Movable servers in the order that leaves the best layout as each is taken out: the most redundant first."""
    totals, left, order = _layout_totals(spans, num_blocks, starts), [s for s in spans if not s.pinned], []
    while left:
        without = np.stack([_place(totals, starts[s.peer_id], s.length_at(starts[s.peer_id]), -s.throughput)
                            for s in left])
        pick = _leximin_best(without)[1]
        order.append(left.pop(pick))
        totals = without[pick]
    return order


def _reinsert(spans: tuple[_Span, ...], num_blocks: int, starts: dict[str, int],
              removed: Sequence[_Span]) -> dict[str, int]:
    """`removed` taken out and placed again, the most capacity first, each where it most raises the order."""
    starts = dict(starts)
    totals = _layout_totals([s for s in spans if s not in removed], num_blocks, starts)
    for s in sorted(removed, key=lambda s: (-s.throughput * s.capacity, s.peer_id)):
        start = starts[s.peer_id] = _best(totals, s.rows(num_blocks), s.throughput)
        totals[start:start + s.length_at(start)] += s.throughput
    return starts


def should_move(servers: Sequence[ServerInfo], num_blocks: int, me: ServerInfo,
                min_gain: float = MIN_GAIN, sizes: Sequence[float] | None = None) -> int | None:
    """A better start for `me` (which may appear in `servers`), or None to stay.

    `servers` are the live ones as far as the caller knows (see `suspects`): online, or loading
    a span they announced ("joining"). With `sizes`, see `plan`.
    """
    others = [s for s in servers if s.peer_id != me.peer_id]
    sizes = relative_sizes(sizes)
    start, end = me.whole_span
    me = dataclasses.replace(me, start=start, end=min(end, num_blocks), target=None)
    if len(others) < PLAN_MAX_SERVERS:
        start = _planned_move(others, num_blocks, me, sizes)
        if start is not False:
            return start
    totals, counts = _coverage(others, num_blocks)
    length = me.end - me.start
    ends = span_ends(_capacity(me, num_blocks, sizes), num_blocks, sizes)
    rows = _rows(num_blocks, ends)
    if (_place(counts, me.start, length, 1) == 0).any():
        return _fill_holes(counts, me.start, length, rows)
    best = _best(totals, rows, me.throughput)
    current = _place(totals, me.start, length, me.throughput)
    moved = _place(totals, best, ends[best] - best, me.throughput)
    return best if best != me.start and moved.min() >= min_gain * current.min() else None


def back_off(servers: Sequence[ServerInfo], num_blocks: int, me: ServerInfo,
             sizes: Sequence[float] | None = None) -> int | None:
    """Where `me`, which has just announced the span it moves to (`whole_span`), goes instead; None to stay.

    Servers that plan from views a moment apart can claim the same gap and leave another without a
    server (one planned with a view that had not shown the other's move yet). So once its claim is
    announced, a server reads the others': where some block of its gap (served by no other server)
    is being loaded by another too, and the best span for it (`best_start`, with the others' claims)
    holds more blocks that nobody holds, it goes there. Of two servers claiming at once, the later
    reads the other's claim, and gives way; back-offs can collide in turn, so a server that gave way
    reads again (up to BACK_OFF_ROUNDS reads). Only a collision counts: movers of one plan read
    mid-move leave gaps for each other that merely look unclaimed. In a large swarm (PLAN_MAX_SERVERS
    or more), where servers choose for themselves, their hole-closing moves see to it instead.
    """
    others = [s for s in servers if s.peer_id != me.peer_id]
    if len(others) >= PLAN_MAX_SERVERS:
        return None
    start, end = me.whole_span
    length = min(end, num_blocks) - start
    held, serving = block_throughputs(others, num_blocks), served_throughputs(others, num_blocks)
    mine = slice(start, start + length)
    if not ((serving[mine] == 0) & (held[mine] > 0)).any():  # no other server loads a block of my gap
        return None
    sizes = relative_sizes(sizes)
    ends = span_ends(_capacity(me, num_blocks, sizes), num_blocks, sizes)
    best = _best(held, _rows(num_blocks, ends), me.throughput)
    return best if (held[best:ends[best]] == 0).sum() > (held[mine] == 0).sum() else None


def suspects(servers: Sequence[ServerInfo], num_blocks: int,
             reported: frozenset[str] = frozenset()) -> list[ServerInfo]:
    """Servers worth checking for life before planning, up to MAX_PROBES: those `reported` unreachable by
    another first, then online ones holding blocks few others hold (in a swarm of up to MAX_PROBES, all).

    A crashed server's announcement outlives it until it expires; where its blocks have other
    servers that costs little, but a block it held alone (or nearly) is a hole nobody sees. In a
    small swarm a burst of crashes can leave blocks whose every announced server is dead. The
    first server to find that reports it, so that the servers that should move learn within a
    poll rather than at their next periodic check; a report is a claim, checked like any suspect.
    """
    counts = _coverage(servers, num_blocks)[1]
    held = {s.peer_id: range(s.whole_span[0], min(s.whole_span[1], num_blocks)) for s in servers}
    checked = [s for s in servers if s.state == "online" or s.peer_id in reported]
    if len(checked) > MAX_PROBES:
        thin = np.concatenate([[0], np.cumsum(counts <= PROBE_COVERAGE)])
        checked = [s for s in checked
                   if s.peer_id in reported or thin[held[s.peer_id].stop] > thin[held[s.peer_id].start]]
    return sorted(checked, key=lambda s: (s.peer_id not in reported,
                                          counts[held[s.peer_id].start:held[s.peer_id].stop].min()))[:MAX_PROBES]


def _planned_move(others: list[ServerInfo], num_blocks: int, me: ServerInfo,
                  sizes: tuple[float, ...] | None) -> int | None | bool:
    """`me`'s move in the swarm's plan, if it goes now; None to stay; False where the plan leaves holes."""
    spans = _spans([*others, me], num_blocks, sizes)
    layout, going = _plan(spans, num_blocks)
    layout = dict(layout)
    if (_layout_totals(spans, num_blocks, layout) == 0).any():
        return False  # leave it to the chain of hole-closing moves
    return layout[me.peer_id] if me.peer_id in going else None


def _cover(spans: tuple[_Span, ...], num_blocks: int, starts: dict[str, int], parts: int = 1) -> dict[str, int]:
    """The layout `starts` with its holes filled by few moves, each hole shared by up to `parts` servers, preferring
    servers whose blocks others hold.

    Hole by hole from the first, the server that covers most of it (of its share: a `parts`-th,
    though at least COVER_MIN_SHARE blocks) moves to its best start that does; of equals, the one
    whose going leaves fewest blocks to nobody (a long server can cover as much of a wide hole as a
    short one whose blocks others hold, and leave a hole), then the one serving most blocks, then
    the one leaving the best layout. Holes it leaves are filled in turn (a chain). What a fresh
    layout gains may take minutes of moves to reach; this closes the holes with a few. A server
    loads a hole's blocks one by one, so a wide hole that several share is served again sooner, for
    more moves.
    """
    starts = dict(starts)
    totals = _layout_totals(spans, num_blocks, starts)
    free = [s for s in spans if not s.pinned and not s.loading]
    shares: dict[int, int] = {}  # per hole (by its end, which filling from its start keeps), the most one server takes
    for _ in range(len(free)):
        holes = np.flatnonzero(totals == 0)
        if not len(holes) or not free:
            break
        first = int(holes[0])
        width = int(np.argmax(np.append(totals[first:], 1.0) > 0))
        pieces = max(1, min(parts, width // COVER_MIN_SHARE))  # none under COVER_MIN_SHARE blocks
        share = shares.setdefault(first + width, -(-width // pieces))
        options = []
        for s in free:
            left = _settled(_place(totals, starts[s.peer_id], s.length_at(starts[s.peer_id]), -s.throughput))
            ends, at = np.array(s.ends), np.arange(len(s.ends))
            size = min(int(np.where(at <= first, ends - first, 0).max()), width, share)  # covers [first, first + size)
            at = at[(at <= first) & (ends >= first + size)]
            in_hole = np.minimum(ends[at], first + width) - np.maximum(at, first)
            at = at[in_hole <= share] if (in_hole <= share).any() else at  # the rest of the hole is others' share
            rows = left + s.throughput * s.rows(num_blocks)[at]
            ranked, best = _leximin_best(rows)
            opened = ((rows[best] == 0) & (totals > 0)).sum()  # blocks its going leaves to nobody
            options.append((size, -opened, (rows[best] > 0).sum(), tuple(ranked[best]), s.peer_id, s, int(at[best]),
                            rows[best]))
        *_, s, start, totals = max(options)
        starts[s.peer_id] = start
        free.remove(s)
    return starts


def _improve(spans: tuple[_Span, ...], num_blocks: int, starts: dict[str, int]) -> dict[str, int]:
    """One movable server after another moves to its best start where that gains PLAN_GAIN, until none does."""
    starts = dict(starts)
    totals = _layout_totals(spans, num_blocks, starts)
    for _ in range(PLAN_ROUNDS):
        moved = False
        for s in spans:
            if s.pinned:
                continue
            start = starts[s.peer_id]
            totals[start:start + s.length_at(start)] -= s.throughput
            best = _best(totals, s.rows(num_blocks), s.throughput)
            if best != start and leximin_gain(_place(totals, best, s.length_at(best), s.throughput),
                                              _place(totals, start, s.length_at(start), s.throughput)) >= PLAN_GAIN:
                start, moved = best, True
            starts[s.peer_id] = start
            totals[start:start + s.length_at(start)] += s.throughput
        if not moved:
            break
    return starts


def _layout_totals(spans: Sequence[_Span], num_blocks: int, starts: dict[str, int]) -> np.ndarray:
    totals = np.zeros(num_blocks)
    for s in spans:
        start = starts[s.peer_id]
        totals[start:start + s.length_at(start)] += s.throughput
    return totals


def _served_totals(spans: Sequence[_Span], num_blocks: int) -> np.ndarray:
    totals = np.zeros(num_blocks)
    for s in spans:
        totals[s.served.start:s.served.stop] += s.throughput
    return totals


def _fill_holes(counts: np.ndarray, start: int, length: int, rows: np.ndarray) -> int | None:
    """The start leaving the fewest holes, then the holes nearest to spare coverage, if that beats staying.

    When no single move closes a hole, the spare coverage (blocks held twice) may be far from it:
    then the servers between them shift one after another, each bringing hole and spare closer,
    until one move closes the hole. Every such step strictly lowers (holes, distance), so the
    servers cannot move in circles.
    """
    placed = counts + np.vstack([rows, _place(np.zeros(len(counts)), start, length, 1) > 0])  # the last: staying
    holes = placed == 0
    spare = placed >= 2
    index = np.arange(len(counts))
    gaps = np.abs(index[:, None] - index[None, :])
    nearest = np.where(spare[:, None, :], gaps[None], np.inf).min(axis=2)
    distance = np.where(holes, nearest, 0.0).sum(axis=1)
    order = np.lexsort((distance[:-1], holes[:-1].sum(axis=1)))
    best = int(order[0])
    better = (holes[best].sum(), distance[best]) < (holes[-1].sum(), distance[-1])
    return best if better else None


def _coverage(servers: Sequence[ServerInfo], num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block: summed throughput (exactly 0 where no server is) and number of servers."""
    deltas, counts = np.zeros(num_blocks + 1), np.zeros(num_blocks + 1, dtype=np.int64)
    if servers:
        starts = np.array([min(s.whole_span[0], num_blocks) for s in servers])
        ends = np.array([min(s.whole_span[1], num_blocks) for s in servers])
        rates = np.array([s.throughput for s in servers], dtype=float)
        np.add.at(deltas, starts, rates)
        np.add.at(deltas, ends, -rates)
        np.add.at(counts, starts, 1)
        np.add.at(counts, ends, -1)
    counts = np.cumsum(counts[:-1])
    return np.where(counts > 0, np.cumsum(deltas[:-1]), 0.0), counts


@functools.lru_cache(maxsize=1024)  # the spans of the servers in view, read over and over while planning
def _rows(num_blocks: int, ends: tuple[int, ...]) -> np.ndarray:
    """Row s: which blocks the span from s to ends[s] covers (read-only)."""
    index = np.arange(num_blocks)
    rows = (index >= np.arange(len(ends))[:, None]) & (index < np.array(ends)[:, None])
    rows.flags.writeable = False
    return rows


def _settled(totals: np.ndarray) -> np.ndarray:
    """Per-block throughputs after adding and taking away servers, rounded to 1e-9 (so that equal layouts compare
    equal), and exactly 0 where nobody is left: the rounding errors add up to +-1e-9 over a few moves, which must
    not pass for a server."""
    out = totals.round(9)
    out[np.abs(out) < 1e-6] = 0.0
    return out


def _place(values: np.ndarray, start: int, length: int, amount: float) -> np.ndarray:
    out = values.copy()
    out[start:start + length] += amount
    return out
