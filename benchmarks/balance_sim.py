"""Discrete-event simulation of block selection and rebalancing in a large, churning swarm.

Servers of mixed hardware join an 80-block model, pick spans with the same functions a real
server runs (`choose_best_span` on joining, `should_move` every balance period with jitter),
crash or leave, and are replaced. No processes, no network: the DHT is a dict of records, where
a crashed server's record outlives it until it expires and a loading server shows as "joining".

What is reported, sampled every few seconds after the initial formation:
- ratio: the swarm's throughput (its weakest block, summed over the servers serving it) over the
  best any assignment of the same live servers could reach. That best is bounded above by
  C / num_blocks with C = sum(throughput_i * blocks_i): the optimum of the relaxation where each
  server may spread its blocks fractionally and non-contiguously (by symmetry the even spread is
  optimal there). Contiguous whole spans can only do worse, so the ratio is conservative.
- planner: the same ratio for a central planner that places the live servers from scratch, biggest
  first, with the same leximin rule: what hindsight and coordination would buy, for reference.
- holes: the share of time some block had no serving server, and after a burst of crashes how
  long until every block is served again and the ratio is back to >= 90%.
Baselines in the same run: random spans, and greedy joining without rebalancing.

    python benchmarks/balance_sim.py [--quick]      (or python -m benchmarks.balance_sim)
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import time
from dataclasses import dataclass, field, replace

import numpy as np

from swarmtune.records import ServerInfo
from swarmtune.server.block_selection import best_start, block_throughputs, choose_best_span, should_move

# (hardware, throughput per block, blocks that fit, share of servers): Llama-2-70B-like blocks, nf4
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


@dataclass
class Params:
    num_blocks: int = 80
    servers: int = 1000
    policy: str = "balance"
    duration: float = 7200.0          # simulated seconds
    formation: float = 300.0          # the initial servers arrive uniformly over this many seconds
    warmup: float = 900.0             # measuring starts after this
    churn: float = 0.1                # share of servers replaced per churn_period (Poisson, one at a time)
    churn_period: float = 600.0
    burst: float = 0.0                # share of servers crashing at once every burst_period (replaced over it)
    burst_period: float = 1800.0
    crash_share: float = 0.5          # departures that crash (their record lingers) rather than withdraw
    balance_period: float = 120.0     # mean seconds between a server's rebalancing checks (x0.5-1.5 jitter)
    update_period: float = 15.0
    expiration: float = 45.0
    load_s: float = 10.0              # start-up time of a server, plus load_s_per_block per block
    load_s_per_block: float = 2.0
    sample_period: float = 10.0
    plan_period: float = 600.0        # how often the central-planner reference is computed
    seed: int = 0


@dataclass
class Result:
    ratios: list[float] = field(default_factory=list)
    planner: list[float] = field(default_factory=list)
    holes: int = 0
    moves: int = 0
    server_seconds: float = 0.0
    bursts: list[list] = field(default_factory=list)  # [time, served again at, and >= 90% again at] (None: never)


@dataclass
class _Server:
    info: ServerInfo
    blocks: int
    alive: bool = True
    ready: bool = False     # loaded once: counts towards what the swarm could do
    epoch: int = 0          # invalidates the load-completion event of an abandoned span


class Simulation:
    def __init__(self, params: Params):
        self.p = params
        self.rng = random.Random(params.seed)                   # the world: arrivals, hardware, departures
        self.decisions = random.Random(params.seed + 1)        # the servers: tie-breaks, jitter, random spans
        self.now = 0.0
        self.events: list = []
        self.counter = itertools.count()
        self.servers: dict[str, _Server] = {}
        self.records: dict[str, ServerInfo] = {}    # the DHT: joining and online announcements
        self.result = Result()

    # ---- event plumbing --------------------------------------------------------------------------

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self.events, (t, next(self.counter), fn, args))

    def run(self) -> Result:
        p = self.p
        for _ in range(p.servers):
            self.at(self.rng.uniform(0, p.formation), self.join)
        if p.churn > 0:
            self.at(p.warmup + self._churn_gap(), self.churn)
        if p.burst > 0:
            self.at(p.warmup + p.burst_period / 2, self.crash_burst)
        self.at(p.warmup, self.sample)
        self.at(p.warmup, self.plan)
        while self.events:
            t, _, fn, args = heapq.heappop(self.events)
            if t > p.duration:
                break
            self.now = t
            fn(*args)
        return self.result

    # ---- servers ---------------------------------------------------------------------------------

    def join(self) -> None:
        name, throughput, blocks, _ = self.rng.choices(HARDWARE, weights=[h[3] for h in HARDWARE])[0]
        throughput *= self.rng.uniform(0.8, 1.2)
        blocks = min(blocks, self.p.num_blocks)
        peer = f"{name}#{next(self.counter)}"
        if self.p.policy == "random":
            start = self.decisions.randrange(self.p.num_blocks - blocks + 1)
        else:
            start = choose_best_span(list(self.records.values()), self.p.num_blocks, blocks, throughput,
                                     self.decisions)
        server = _Server(ServerInfo(peer, start, start + blocks, "joining", throughput=throughput), blocks)
        self.servers[peer] = server
        self._load(server, start)
        if self.p.policy == "balance":
            self.at(self.now + self._balance_gap(), self.check, peer)

    def _load(self, server: _Server, start: int) -> None:
        server.epoch += 1
        server.info = replace(server.info, start=start, end=start + server.blocks, state="joining")
        self.records[server.info.peer_id] = server.info
        self.at(self.now + self.p.load_s + self.p.load_s_per_block * server.blocks, self.loaded,
                server.info.peer_id, server.epoch)

    def loaded(self, peer: str, epoch: int) -> None:
        server = self.servers[peer]
        if server.alive and server.epoch == epoch:
            server.info = replace(server.info, state="online")
            server.ready = True
            self.records[peer] = server.info

    def check(self, peer: str) -> None:
        server = self.servers[peer]
        if not server.alive:
            return
        if server.info.state == "online":
            start = should_move(list(self.records.values()), self.p.num_blocks, server.info)
            if start is not None:
                self.result.moves += 1
                self._load(server, start)
        self.at(self.now + self._balance_gap(), self.check, peer)

    def leave(self, peer: str) -> None:
        server = self.servers[peer]
        server.alive = False
        if self.rng.random() < self.p.crash_share:  # the record lives on until it expires
            self.at(self.now + self.rng.uniform(self.p.expiration - self.p.update_period, self.p.expiration),
                    self.records.pop, peer, None)
        else:
            self.records.pop(peer, None)

    # ---- churn -----------------------------------------------------------------------------------

    def churn(self) -> None:
        alive = [peer for peer, s in self.servers.items() if s.alive]
        if alive:
            self.leave(self.rng.choice(alive))
        self.join()
        self.at(self.now + self._churn_gap(), self.churn)

    def crash_burst(self) -> None:
        alive = [peer for peer, s in self.servers.items() if s.alive]
        gone = self.rng.sample(alive, int(self.p.burst * len(alive)))
        for peer in gone:
            self.leave(peer)
        for _ in gone:
            self.at(self.now + self.rng.uniform(0, self.p.burst_period / 2), self.join)
        self.result.bursts.append([self.now, None, None])
        if self.now + 2 * self.p.burst_period <= self.p.duration:  # leave every burst a period to recover in
            self.at(self.now + self.p.burst_period, self.crash_burst)

    def _churn_gap(self) -> float:
        return self.rng.expovariate(self.p.churn * self.p.servers / self.p.churn_period)

    def _balance_gap(self) -> float:
        return self.p.balance_period * self.decisions.uniform(0.5, 1.5)

    # ---- measurement -----------------------------------------------------------------------------

    def sample(self) -> None:
        serving = [s.info for s in self.servers.values() if s.alive and s.info.state == "online"]
        totals = block_throughputs(serving, self.p.num_blocks)
        capacity = sum(s.info.throughput * s.blocks for s in self.servers.values() if s.alive and s.ready)
        ratio = totals.min() / (capacity / self.p.num_blocks) if capacity else 0.0
        result = self.result
        result.ratios.append(ratio)
        holes = bool((totals == 0).any())
        result.holes += holes
        alive = sum(s.alive for s in self.servers.values())
        result.server_seconds += alive * self.p.sample_period
        for burst in result.bursts:
            if not holes:
                burst[1] = burst[1] or self.now
                if ratio >= 0.9:
                    burst[2] = burst[2] or self.now
        self.at(self.now + self.p.sample_period, self.sample)

    def plan(self) -> None:
        ready = [s for s in self.servers.values() if s.alive and s.ready]
        capacity = sum(s.info.throughput * s.blocks for s in ready)
        if capacity:
            self.result.planner.append(planned_min(ready, self.p.num_blocks) / (capacity / self.p.num_blocks))
        self.at(self.now + self.p.plan_period, self.plan)


def planned_min(servers: list[_Server], num_blocks: int) -> float:
    """The weakest block when the servers are placed one by one from scratch, largest capacity first."""
    totals = np.zeros(num_blocks)
    for server in sorted(servers, key=lambda s: s.info.throughput * s.blocks, reverse=True):
        start = best_start(totals, server.blocks, server.info.throughput)
        totals[start:start + server.blocks] += server.info.throughput
    return float(totals.min())


def simulate(params: Params) -> Result:
    return Simulation(params).run()


def summarize(result: Result) -> dict:
    ratios = np.array(result.ratios)
    hours = result.server_seconds / 3600
    return dict(mean=float(ratios.mean()), p5=float(np.percentile(ratios, 5)), min=float(ratios.min()),
                planner=float(np.mean(result.planner)),
                holes=result.holes / len(ratios), moves_per_server_hour=result.moves / hours if hours else 0.0,
                covered=_worst_recovery(result.bursts, 1), ninety=_worst_recovery(result.bursts, 2))


def _worst_recovery(bursts: list[list], field: int) -> str:
    """The longest time from a burst to recovery, or how many bursts never recovered."""
    if not bursts:
        return "-"
    never = sum(b[field] is None for b in bursts)
    return f"{never}/{len(bursts)} never" if never else f"{max(b[field] - b[0] for b in bursts):.0f}"


def scenarios(quick: bool) -> list[Params]:
    big, duration = (200, 3600.0) if quick else (1000, 7200.0)
    return [
        Params(servers=big, churn=0.1, duration=duration),
        Params(servers=big, churn=0.0, burst=0.1, duration=duration),
        Params(servers=60, churn=0.1, churn_period=3600.0, duration=duration),
        Params(servers=12, churn=0.0, burst=0.3, duration=duration),
    ]


def describe(p: Params) -> str:
    if p.burst:
        return f"{p.servers} servers, {p.burst:.0%} crash every {p.burst_period / 60:.0f} min"
    return f"{p.servers} servers, {p.churn:.0%} churn / {p.churn_period / 60:.0f} min"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller swarms and shorter runs (a smoke test)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"{'scenario':36} {'policy':8} {'mean':>6} {'p5':>6} {'min':>6} {'planner':>7} {'holes':>6} "
          f"{'moves/srv/h':>11} {'covered':>9} {'>=90%':>9} {'wall s':>6}")
    for params in scenarios(args.quick):
        for policy in args.policies:
            began = time.perf_counter()
            s = summarize(simulate(replace(params, policy=policy, seed=args.seed)))
            print(f"{describe(params):36} {policy:8} {s['mean']:6.1%} {s['p5']:6.1%} {s['min']:6.1%} "
                  f"{s['planner']:7.1%} {s['holes']:6.1%} {s['moves_per_server_hour']:11.3f} "
                  f"{s['covered']:>9} {s['ninety']:>9} {time.perf_counter() - began:6.1f}",
                  flush=True)
    print("mean/p5/min: swarm throughput (its weakest block) over C/num_blocks, the bound of a fractional "
          "assignment;\nplanner: the same for a from-scratch central placement (mean); holes: share of samples "
          "with an unserved block;\ncovered / >=90%: worst seconds from a crash burst until every block is served "
          "again / and the ratio is back to >= 90%.")

if __name__ == "__main__":
    main()
