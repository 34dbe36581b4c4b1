"""Discrete-event simulation of block selection and rebalancing, in large churning swarms and small ones.

Servers of mixed hardware join a model's blocks, pick spans with the same functions a real
server runs (`join_start` on joining, `should_move` every balance period with jitter),
crash or leave, and are replaced. No processes, no network: the DHT is a dict of records that
show up `dht_delay` after they are written, where a crashed server's record outlives it until it
expires (unless a server probing it before planning finds it dead; it then reports it, and the
others' next poll plans without it). A server loads
`load_s_per_block` per block, after `load_s` of start-up when it joins and `move_s` when it moves,
as the real one does: in `load_order`, serving each block once it is loaded, and on a move the
blocks its old and new spans share all along. It shows as "joining" until its first block is in.
Once a move is visible, the server gives way where another server claimed the same gap
(`back_off`). In a swarm of up to MAX_PROBES servers each poll pings every server; a server
waits out PROBE_TIMEOUT on a crashed one only the first time it pings it.

What is reported, sampled every `sample_period` after the warm-up:
- swarm / planner: the swarm's throughput (its weakest block, summed over the online servers
  serving it) over what a central planner reaches when it places the same loaded servers from
  scratch, biggest capacity first, each where it most raises the sorted per-block throughputs:
  what hindsight and coordination would buy. Samples where the planner cannot serve every block
  (too few servers yet) are left out; mean and 5th percentile.
- bound: the swarm's throughput over C / num_blocks with C = sum(throughput_i * blocks_i), the
  optimum of the relaxation where servers spread their blocks fractionally: no layout can beat it.
- holes: the share of samples with a block no online server serves while the planner could serve
  every block; after each burst of crashes, the seconds until every block is served again (worst
  burst, to the load that completes it), counted from when the servers left could serve every block.
- moves per server-hour, after the warm-up; and in steady state, counting only the time (and the moves)
  at least `steady_s` after the last server joined or left.
Baselines in the same run: random spans, and greedy joining without rebalancing. The DeepSeek-V3-shaped
scenarios (blocks of unequal size) run twice: servers placing their spans by count, and by memory.

    python benchmarks/balance_sim.py [--quick]      (or python -m benchmarks.balance_sim)
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from swarmtune.records import ServerInfo
from swarmtune.server.block_selection import (
    BACK_OFF_ROUNDS,
    MAX_PROBES,
    PLAN_MAX_SERVERS,
    anticipated_throughputs,
    back_off,
    best_start,
    choose_best_span,
    join_start,
    kept_blocks,
    layout,
    load_order,
    relative_sizes,
    served_throughputs,
    should_move,
    span_end,
    span_ends,
    suspects,
)

# (hardware, throughput per block, blocks of a Llama-2-70B-like model that fit in nf4, share of servers); with
# blocks of unequal size (Params.sizes), the memory of that many of the model's largest blocks
HARDWARE = [
    ("H100 80GB", 8.0, 40, 0.05),
    ("A100 80GB", 5.0, 40, 0.10),
    ("A100 40GB", 5.0, 20, 0.10),
    ("RTX 4090", 3.0, 12, 0.25),
    ("RTX 3090", 2.0, 12, 0.20),
    ("T4", 0.7, 8, 0.15),
    ("RTX 3060", 1.0, 6, 0.15),
]
POLICIES = ("random", "greedy", "balance")
# DeepSeek-V3's blocks (transformers' DeepseekV3Config, built on the meta device): 3 dense (583.5M parameters),
# then 58 MoE (11,507.3M: 256 routed experts, 1 shared); each token reads about as many parameters in either
# (585M of an MoE block's with 8 experts), so a server serves both at the same tokens/s
DEEPSEEK_V3_SIZES = (583.5 / 11507.3,) * 3 + (1.0,) * 58
PROBE_TIMEOUT = 2.0   # what asking a dead server costs before it counts as dead


@dataclass
class Params:
    name: str = ""
    num_blocks: int = 80
    servers: int = 1000
    fleet: tuple[str, ...] = ()       # hardware names to join in this order, cycled (default: drawn by share)
    policy: str = "balance"
    duration: float = 7200.0          # simulated seconds
    formation: float = 300.0          # the initial servers arrive uniformly over this many seconds
    one_by_one: bool = False          # ... or one every formation / servers seconds, in fleet order
    warmup: float = 900.0             # measuring starts after this
    churn: float = 0.0                # share of servers replaced per churn_period (Poisson, one at a time)
    churn_period: float = 600.0
    burst: float = 0.0                # share of servers crashing at once every burst_period (replaced over it)
    burst_period: float = 1800.0
    crash_share: float = 0.5          # departures that crash (their record lingers) rather than withdraw
    balance_period: float = 10.0      # mean seconds between a server's checks whether to move (x0.5-1.5 jitter)
    poll_period: float = 2.0          # ... and in a small swarm a check this soon after the records change
    update_period: float = 15.0
    expiration: float = 45.0
    dht_delay: float = 1.0            # a record written becomes visible to readers this much later
    load_s: float = 10.0              # start-up time of a joining server before it loads its blocks
    move_s: float = 2.0               # the same for a server moving to another span
    load_s_per_block: float = 2.0
    sample_period: float = 5.0
    steady_s: float = 300.0           # steady state: this long after the last server joined or left
    seed: int = 0
    sizes: tuple[float, ...] | None = None  # each block's memory relative to the largest (None: all alike)
    by_bytes: bool = True             # with sizes: servers place spans by memory; False: N blocks of any kind


@dataclass
class Result:
    ratios: list[float] = field(default_factory=list)      # swarm / planner
    bounds: list[float] = field(default_factory=list)      # swarm / fractional bound
    samples: int = 0
    holes: int = 0
    moves: int = 0
    server_seconds: float = 0.0
    steady_moves: int = 0
    steady_server_seconds: float = 0.0
    # per crash burst: [since, every block served again at]: since the burst, or where the servers left could not
    # serve every block, since they could (a server joined); None: not yet
    bursts: list[list] = field(default_factory=list)


@dataclass
class _Server:
    info: ServerInfo
    capacity: float         # blocks it holds, or with sizes, the memory of as many of the largest
    alive: bool = True
    ready: bool = False     # loaded once: counts towards what the swarm could do
    epoch: int = 0          # invalidates the load-completion event of an abandoned span
    seen: tuple = ()        # the layout and reports at its last check
    found_dead: frozenset = frozenset()  # crashed servers it pinged already: it does not wait on them again

    @property
    def checking(self) -> bool:
        """Whether it checks the swarm: a server loading its span does not until it is done."""
        return self.info.state == "online" and self.info.target is None


class Simulation:
    def __init__(self, params: Params):
        self.p = params
        self.rng = random.Random(params.seed)                   # the world: arrivals, hardware, departures
        self.decisions = random.Random(params.seed + 1)        # the servers: tie-breaks, jitter, random spans
        self.now = 0.0
        self.events: list = []
        self.counter = itertools.count()
        self.joined = 0
        self.servers: dict[str, _Server] = {}
        self.records: dict[str, ServerInfo] = {}    # the DHT as readers see it
        self.expiries: dict[str, float] = {}
        self.reported: dict[str, float] = {}        # servers reported unreachable, and until when
        self.version = 0                            # bumped when a record, or whether its server lives, changes
        self.layout: tuple[int, tuple] = (-1, ())  # `layout` of the records and the reports, and their version
        self.viewed: tuple[int, list[ServerInfo], frozenset] = (-1, [], frozenset())
        self.planned: tuple[frozenset, float] = (frozenset(), 0.0)
        self.result = Result()
        self.changed = 0.0                          # when a server last joined or left
        self.sizes = relative_sizes(params.sizes)   # the blocks' memory, as the central planner and the bound see it
        self.placed = self.sizes if params.by_bytes else None  # ... and as the servers place their spans

    # ---- event plumbing --------------------------------------------------------------------------

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self.events, (t, next(self.counter), fn, args))

    def run(self) -> Result:
        p = self.p
        for i in range(p.servers):
            self.at(p.formation * (i + 1) / p.servers if p.one_by_one else self.rng.uniform(0, p.formation), self.join)
        if p.churn > 0:
            self.at(p.warmup + self._churn_gap(), self.churn)
        if p.burst > 0:
            self.at(p.warmup + p.burst_period / 2, self.crash_burst)
        self.at(p.warmup, self.sample)
        while self.events:
            t, _, fn, args = heapq.heappop(self.events)
            if t > p.duration:
                break
            self.now = t
            fn(*args)
        return self.result

    # ---- the DHT ---------------------------------------------------------------------------------

    def publish(self, info: ServerInfo) -> None:
        self.at(self.now + self.p.dht_delay, self._show, info, self.now + self.p.expiration)

    def report(self, dead: frozenset[str]) -> None:
        self.at(self.now + self.p.dht_delay, self._show_report, dead, self.now + self.p.expiration)

    def _show_report(self, dead: frozenset[str], expires: float) -> None:
        self.version += any(peer not in self.reported for peer in dead)
        for peer in dead:
            self.reported[peer] = max(expires, self.reported.get(peer, expires))
            self.at(expires, self._hide_report, peer)

    def _hide_report(self, peer: str) -> None:
        if self.reported.get(peer, float("inf")) <= self.now:
            self.version += 1
            del self.reported[peer]

    def withdraw(self, peer: str) -> None:
        self.at(self.now + self.p.dht_delay, self._hide, peer, None)

    def _show(self, info: ServerInfo, expires: float) -> None:
        if self.records.get(info.peer_id) != info:
            self.version += 1
        self.records[info.peer_id], self.expiries[info.peer_id] = info, expires
        self.at(expires, self._hide, info.peer_id, expires)

    def _hide(self, peer: str, expires: float | None) -> None:
        if expires is None or self.expiries.get(peer) == expires:  # not refreshed since
            self.version += peer in self.records
            self.records.pop(peer, None)
            self.expiries.pop(peer, None)

    def view(self) -> tuple[list[ServerInfo], frozenset[str]]:
        """The records a server reads, less the ones it pinged and found dead; and those.

        The same for every server until a record or a server's life changes, so it is computed once per change.
        """
        if self.viewed[0] != self.version:
            servers = list(self.records.values())
            dead = frozenset(s.peer_id for s in suspects(servers, self.p.num_blocks, self.reports())
                             if not self.servers[s.peer_id].alive)
            self.viewed = self.version, [s for s in servers if s.peer_id not in dead], dead
        return self.viewed[1], self.viewed[2]

    def reports(self) -> frozenset[str]:
        """The servers reported unreachable that still have a record (as the server's `balance_forever` reads them)."""
        return frozenset(peer for peer in self.reported if peer in self.records)

    # ---- servers ---------------------------------------------------------------------------------

    def join(self) -> None:
        p = self.p
        if p.fleet:
            name = p.fleet[self.joined % len(p.fleet)]
            _, throughput, blocks, _ = next(h for h in HARDWARE if h[0] == name)
        else:
            name, throughput, blocks, _ = self.rng.choices(HARDWARE, weights=[h[3] for h in HARDWARE])[0]
        self.joined += 1
        self.changed = self.now
        throughput *= self.rng.uniform(0.8, 1.2)
        capacity = min(blocks, p.num_blocks)
        peer = f"{name}#{next(self.counter)}"
        if p.policy == "random":
            start = self.decisions.randrange(len(span_ends(capacity, p.num_blocks, self.placed)))
        elif p.policy == "greedy":
            start = choose_best_span(self.view()[0], p.num_blocks, capacity, throughput, self.decisions, self.placed)
        else:
            me = ServerInfo(peer, 0, self._end(capacity, 0), "joining", throughput=throughput, capacity=capacity)
            start = join_start(self.view()[0], p.num_blocks, me, self.decisions, self.placed)
        info = ServerInfo(peer, start, self._end(capacity, start), "joining", throughput=throughput, capacity=capacity)
        server = _Server(info, capacity)
        self.servers[peer] = server
        self._load(server, start, p.load_s)
        self.at(self.now + p.update_period, self.refresh, peer)
        if p.policy == "balance":
            self.at(self.now + self._balance_gap(), self.check, peer, True)
            self.at(self.now + p.poll_period, self.check, peer, False)

    def _end(self, capacity: float, start: int) -> int:
        """Where the span at `start` of a server with `capacity` ends."""
        return span_end(capacity, start, self.p.num_blocks, self.placed)

    def _load(self, server: _Server, start: int, overhead: float) -> None:
        """Load [start, start + blocks) block by block (`load_order`), serving each as it comes."""
        server.epoch += 1
        self._claim(server, start, range(0))
        self._load_blocks(server, self.now + overhead, range(0))

    def _move(self, server: _Server, start: int, overhead: float, kept: range) -> None:
        """Like `_load`, serving `kept` meanwhile; once the claim is visible and checked against the others'
        (`back_off`)."""
        server.epoch += 1
        self._claim(server, start, kept)
        self.at(self.now + self.p.dht_delay, self._back_off, server, server.epoch, self.now + overhead, kept)

    def _claim(self, server: _Server, start: int, kept: range) -> None:
        whole = (start, self._end(server.capacity, start))
        if len(kept):
            server.info = replace(server.info, start=kept.start, end=kept.stop, state="online", target=whole)
        else:
            server.info = replace(server.info, start=start, end=whole[1], state="joining", target=None)
        self.publish(server.info)

    def _back_off(self, server: _Server, epoch: int, loads_from: float, kept: range,
                  reads: int = BACK_OFF_ROUNDS) -> None:
        if not server.alive or server.epoch != epoch:
            return
        start = back_off(self.view()[0], self.p.num_blocks, server.info, self.placed)
        if start is not None:
            kept = kept_blocks(kept, start, self._end(server.capacity, start) - start)
            self._claim(server, start, kept)
            if reads > 1:  # the new claim may collide in turn: read again once it is visible
                self.at(self.now + self.p.dht_delay, self._back_off, server, epoch, loads_from, kept, reads - 1)
                return
        self._load_blocks(server, loads_from, kept)

    def _load_blocks(self, server: _Server, loads_from: float, kept: range) -> None:
        start, end = server.info.whole_span
        order = load_order(anticipated_throughputs(self.view()[0], self.p.num_blocks), start, end - start, kept)
        for i, block in enumerate(order, 1):
            self.at(max(self.now, loads_from) + self.p.load_s_per_block * i, self.loaded, server.info.peer_id,
                    server.epoch, block)

    def loaded(self, peer: str, epoch: int, block: int) -> None:
        server = self.servers[peer]
        if not server.alive or server.epoch != epoch:
            return
        info = server.info
        whole = info.whole_span
        served = (block, block + 1) if info.state == "joining" else (min(info.start, block), max(info.end, block + 1))
        server.info = replace(info, start=served[0], end=served[1], state="online",
                              target=None if served == whole else whole)
        server.ready |= served == whole
        self.publish(server.info)
        self._note_coverage()

    def refresh(self, peer: str) -> None:
        server = self.servers[peer]
        if server.alive:
            self.publish(server.info)
            self.at(self.now + self.p.update_period, self.refresh, peer)

    def check(self, peer: str, periodic: bool) -> None:
        """A periodic check whether to move, or a poll: in a small swarm, a check if the `layout` changed since the
        last one (as the server's `balance_forever`)."""
        server = self.servers[peer]
        if not server.alive:
            return
        small = len(self.records) <= PLAN_MAX_SERVERS
        if self.layout[0] != self.version:
            self.layout = self.version, (layout(self.records.values()), self.reports())
        probing = len(self.records) <= MAX_PROBES and bool(self.view()[1] - self.reports())  # found a crash
        if periodic or probing or (small and server.seen != self.layout[1]):
            server.seen = self.layout[1]
            self._consider_moving(server)
        if len(self.records) <= MAX_PROBES and server.checking:  # the poll pinged every server
            server.found_dead = self.view()[1]
        gap = self._balance_gap() if periodic or not small else self.p.poll_period
        self.at(self.now + gap, self.check, peer, periodic)

    def _consider_moving(self, server: _Server) -> None:
        info = server.info
        if server.checking:
            servers, dead = self.view()
            if dead - self.reports():
                self.report(dead)
            start = should_move(servers, self.p.num_blocks, info, sizes=self.placed)
            if start is not None:
                self.result.moves += self.now >= self.p.warmup
                self.result.steady_moves += self.now >= self.p.warmup and self.steady()
                self._move(server, start, self.p.move_s + PROBE_TIMEOUT * bool(dead - server.found_dead),
                           kept_blocks(range(info.start, info.end), start, self._end(server.capacity, start) - start))
            server.found_dead = dead

    def leave(self, peer: str) -> None:
        server = self.servers[peer]
        server.alive = False
        self.version += 1
        self.changed = self.now
        if self.rng.random() >= self.p.crash_share:  # withdrawn; a crashed server's record lives on until it expires
            self.withdraw(peer)

    # ---- churn -----------------------------------------------------------------------------------

    def churn(self) -> None:
        alive = [peer for peer, s in self.servers.items() if s.alive]
        if alive:
            self.leave(self.rng.choice(alive))
        self.join()
        self.at(self.now + self._churn_gap(), self.churn)

    def crash_burst(self) -> None:
        alive = [peer for peer, s in self.servers.items() if s.alive]
        gone = self.rng.sample(alive, round(self.p.burst * len(alive)))
        for peer in gone:
            self.leave(peer)
        for _ in gone:
            self.at(self.now + self.rng.uniform(0, self.p.burst_period / 2), self.join)
        ready = [s for s in self.servers.values() if s.alive and s.ready]
        self.result.bursts.append([self.now if self.planner_min(ready) > 0 else None, None])
        self._note_coverage()
        if self.now + 2 * self.p.burst_period <= self.p.duration:  # leave every burst a period to recover in
            self.at(self.now + self.p.burst_period, self.crash_burst)

    def _churn_gap(self) -> float:
        return self.rng.expovariate(self.p.churn * self.p.servers / self.p.churn_period)

    def _balance_gap(self) -> float:
        return self.p.balance_period * self.decisions.uniform(0.5, 1.5)

    # ---- measurement -----------------------------------------------------------------------------

    def sample(self) -> None:
        p, result = self.p, self.result
        weakest = served_throughputs([s.info for s in self.servers.values() if s.alive], p.num_blocks).min()
        ready = [s for s in self.servers.values() if s.alive and s.ready]
        capacity = sum(s.info.throughput * s.capacity for s in ready)
        planner = self.planner_min(ready)
        result.samples += 1
        if planner > 0:
            result.ratios.append(weakest / planner)
        if capacity:
            result.bounds.append(weakest / (capacity / (p.num_blocks if self.sizes is None else sum(self.sizes))))
        result.holes += weakest == 0 and planner > 0  # unserved blocks the servers could have served
        server_seconds = sum(s.alive for s in self.servers.values()) * p.sample_period
        result.server_seconds += server_seconds
        result.steady_server_seconds += server_seconds * self.steady()
        for burst in result.bursts:
            if burst[0] is None and planner > 0:
                burst[0] = self.now
        self._note_coverage()
        self.at(self.now + p.sample_period, self.sample)

    def _note_coverage(self) -> None:
        """Where every block is served again, the end of the bursts recovering: timed to the block loaded, not
        to the next sample."""
        pending = [b for b in self.result.bursts if b[0] is not None and b[1] is None]
        if pending and served_throughputs([s.info for s in self.servers.values() if s.alive],
                                          self.p.num_blocks).min() > 0:
            for burst in pending:
                burst[1] = self.now

    def steady(self) -> bool:
        return self.now - self.changed >= self.p.steady_s

    def planner_min(self, ready: list[_Server]) -> float:
        """`planned_min` of the loaded servers, computed again only when they change."""
        key = frozenset(s.info.peer_id for s in ready)
        if key != self.planned[0]:
            self.planned = key, planned_min([(s.capacity, s.info.throughput) for s in ready], self.p.num_blocks,
                                            self.sizes)
        return self.planned[1]


def planned_min(servers: Sequence[tuple[float, float]], num_blocks: int,
                sizes: tuple[float, ...] | None = None) -> float:
    """The weakest block when (capacity, throughput) servers are placed one by one from scratch, most capacity first
    (by memory, with `sizes`)."""
    totals = np.zeros(num_blocks)
    for capacity, throughput in sorted(servers, key=lambda s: s[0] * s[1], reverse=True):
        start = best_start(totals, capacity, throughput, sizes=sizes)
        totals[start:span_end(capacity, start, num_blocks, sizes)] += throughput
    return float(totals.min())


def simulate(params: Params) -> Result:
    return Simulation(params).run()


def summarize(result: Result) -> dict:
    ratios = np.array(result.ratios or [0.0])
    hours, steady_hours = result.server_seconds / 3600, result.steady_server_seconds / 3600
    recovered = [b[1] - b[0] for b in result.bursts if b[1] is not None]
    return dict(mean=float(ratios.mean()), p5=float(np.percentile(ratios, 5)),
                bound=float(np.mean(result.bounds or [0.0])), holes=result.holes / max(1, result.samples),
                moves_per_server_hour=result.moves / hours if hours else 0.0,
                steady_moves_per_server_hour=result.steady_moves / steady_hours if steady_hours else None,
                covered=max(recovered, default=None), never=len(result.bursts) - len(recovered))


def _average(runs: list[dict]) -> dict:
    """Means over seeds (of steady moves, over those with a steady state); the worst recovery and the bursts never
    recovered from over all of them."""
    out = {key: float(np.mean([r[key] for r in runs])) for key in ("mean", "p5", "bound", "holes",
                                                                   "moves_per_server_hour")}
    steady = [r["steady_moves_per_server_hour"] for r in runs if r["steady_moves_per_server_hour"] is not None]
    covered = [r["covered"] for r in runs if r["covered"] is not None]
    return out | dict(steady_moves_per_server_hour=float(np.mean(steady)) if steady else None,
                      covered=max(covered, default=None), never=sum(r["never"] for r in runs))


def scenarios(quick: bool) -> list[Params]:
    big, duration = (200, 3600.0) if quick else (1000, 7200.0)
    mixed = ("RTX 4090", "A100 40GB", "RTX 3090", "T4", "RTX 3060", "RTX 4090", "RTX 3090", "A100 80GB")
    small = dict(duration=duration, warmup=600.0)
    return [
        Params(f"{big} servers, 10% churn / 10 min", servers=big, churn=0.1, duration=duration),
        Params(f"{big} servers, 10% crash every 30 min", servers=big, burst=0.1, duration=duration),
        Params("60 servers, 10% churn / 60 min", servers=60, churn=0.1, churn_period=3600.0, duration=duration),
        Params("30 servers mixed, 10% churn / 60 min", servers=30, fleet=mixed, churn=0.1, churn_period=3600.0,
               **small),
        Params("12 servers mixed, 30% crash every 30 min", servers=12, fleet=mixed, burst=0.3, **small),
        Params("12 servers drawn, 30% crash every 30 min", servers=12, burst=0.3, **small),
        Params("5 servers mixed, 32 blocks, 1 crash / 30 min", num_blocks=32, servers=5,
               fleet=("RTX 4090", "RTX 3090", "A100 40GB", "RTX 4090", "T4"), burst=0.2, **small),
        Params("1 big + 6 small, 20% churn / 60 min", servers=7, churn=0.2, churn_period=3600.0,
               fleet=("H100 80GB",) + ("RTX 3060", "T4", "RTX 3090") * 2, num_blocks=48, **small),
        Params("30 servers joining one by one (2 min apart)", servers=30, fleet=mixed, one_by_one=True,
               formation=3600.0, warmup=0.0, duration=4800.0),
        *deepseek_scenarios(duration),
    ]


def deepseek_scenarios(duration: float) -> list[Params]:
    """DeepSeek-V3's shape (DEEPSEEK_V3_SIZES), servers placing their spans by count and by memory."""
    tight = ("A100 40GB", "RTX 4090", "RTX 3090", "T4", "T4")  # memory for 60 MoE blocks: the model takes 58.15
    shape = dict(num_blocks=61, sizes=DEEPSEEK_V3_SIZES, duration=duration, warmup=600.0)
    out = []
    for by_bytes, how in ((False, "count"), (True, "bytes")):
        out += [
            Params(f"DeepSeek-V3 12 mixed, 30% crash/30 min, by {how}", servers=12, burst=0.3, by_bytes=by_bytes,
                   fleet=("RTX 4090", "A100 40GB", "RTX 3090", "T4", "RTX 3060", "RTX 4090", "RTX 3090", "A100 80GB"),
                   **shape),
            Params(f"DeepSeek-V3 5 servers, 60 MoE blocks' memory, by {how}", servers=5, fleet=tight,
                   by_bytes=by_bytes, **shape),
        ]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller swarms and shorter runs (a smoke test)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--seeds", type=int, default=1, help="average over this many seeds (0, 1, ...)")
    args = parser.parse_args(argv)
    print(f"{'scenario':46} {'policy':8} {'/planner':>8} {'p5':>6} {'/bound':>6} {'holes':>6} "
          f"{'moves/srv/h':>11} {'steady':>6} {'covered':>8} {'wall s':>6}")
    for params in scenarios(args.quick):
        for policy in args.policies:
            began = time.perf_counter()
            s = _average([summarize(simulate(replace(params, policy=policy, seed=seed))) for seed in range(args.seeds)])
            covered = "-" if s["covered"] is None and not s["never"] else (
                f"{s['never']} never" if s["never"] else f"{s['covered']:.0f}")
            steady = "-" if s["steady_moves_per_server_hour"] is None else f"{s['steady_moves_per_server_hour']:.3f}"
            print(f"{params.name:46} {policy:8} {s['mean']:8.1%} {s['p5']:6.1%} {s['bound']:6.1%} "
                  f"{s['holes']:6.1%} {s['moves_per_server_hour']:11.3f} {steady:>6} {covered:>8} "
                  f"{time.perf_counter() - began:6.1f}", flush=True)
    print("/planner, p5: the swarm's throughput (its weakest block) over a central planner's from scratch, mean and "
          "5th percentile;\n/bound: over C/num_blocks, the bound of a fractional assignment; holes: share of samples "
          "with an unserved block that the planner serves;\n"
          "steady: moves per server-hour at least 5 min after any server joined or left (- where never);\n"
          "covered: worst seconds from a crash burst (or from when the servers left could serve every block) until\n"
          "every block is served again.")


if __name__ == "__main__":
    main()
