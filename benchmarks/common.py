"""What every benchmark shares: plans (sizes per mode), interleaved timing, models, swarms and result tables.

Each figure is measured against a baseline taken in the same run on the same machine, because the
machines are shared and their speed drifts: local and swarm repeats are interleaved so both see
the same background load, and medians are reported with the interquartile spread as the noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from swarmtune import shutdown, transport, wire
from swarmtune.client.config import ClientConfig
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.local_swarm import LocalSwarm
from swarmtune.tiny_model import make_tiny_model

SEED = 0
SPANS = ((0, 2), (2, 4), (4, 6))   # three servers, as in the issues' targets
BACKUP = (2, 4)                    # the span that recovery benchmarks duplicate, then kill


@dataclass(frozen=True)
class Setting:
    """A network the paper measured in; rate None means plain loopback, no emulation."""

    name: str
    rate_mbit: float | None
    rtt_ms: float


PAPER_SETTINGS = (
    Setting("loopback", None, 0.0),   # first: the reference that explains the emulated settings' gaps
    Setting("1 Gbit/s, 2 ms RTT", 1000.0, 2.0),
    Setting("100 Mbit/s, 2 ms RTT", 100.0, 2.0),
    Setting("100 Mbit/s, 100 ms RTT", 100.0, 100.0),
)


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark mode; `full` is what the README reports."""

    name: str
    latency_hidden: int = 64                  # latency figures: a model whose blocks cost little
    wide_hidden: int = 512                    # throughput figures: a model whose blocks dominate the cost
    layers: int = 6
    prompt: int = 16
    new_tokens: int = 32
    speculative_tokens: int = 64              # speculative decoding: long enough for the draft length to adapt
    batches: tuple[int, ...] = (1, 8)
    session_steps: int = 64                   # single-token steps timed for the per-hop overhead
    forward_shapes: tuple[tuple[int, int], ...] = ((1, 128), (8, 512))
    train_shape: tuple[int, int] = (4, 128)
    lora_rank: int = 8
    repeats: int = 7
    warmup: int = 1
    kills: int = 3
    settings: tuple[Setting, ...] = PAPER_SETTINGS
    net_repeats: int = 5
    hostile_window: float = 30.0              # seconds each attack class runs beside the legitimate clients
    hostile_classes: tuple[str, ...] = ()     # attack classes to run (benchmarks.hostile.ATTACKS keys); () = all
    hostile_rebaseline: bool = True           # measure the no-attack baseline again at the end


PLANS = {
    "full": Plan("full"),
    "quick": Plan("quick", wide_hidden=128, new_tokens=16, speculative_tokens=32, session_steps=32,
                  forward_shapes=((1, 32), (4, 64)),
                  train_shape=(2, 32), repeats=3, kills=1, settings=PAPER_SETTINGS[:1], net_repeats=3,
                  hostile_window=10.0),
    "smoke": Plan("smoke", wide_hidden=64, new_tokens=4, speculative_tokens=8, batches=(1,), session_steps=8,
                  forward_shapes=((1, 16),),
                  train_shape=(1, 16), lora_rank=2, repeats=1, kills=1, settings=PAPER_SETTINGS[:1], net_repeats=1,
                  hostile_window=2.0, hostile_classes=("flood", "headers"), hostile_rebaseline=False),
}


@dataclass
class Figure:
    """One measured figure beside its same-run baseline; ratio = swarm / baseline, in the figure's unit."""

    section: str
    name: str
    unit: str
    swarm: float
    baseline: float | None = None
    baseline_name: str = "local"
    noise: float = 0.0            # relative interquartile range of the samples behind `swarm` and `baseline`
    note: str = ""
    best_ratio: float | None = None   # the same ratio from the fastest repeats: the least disturbed by other load
    details: dict = field(default_factory=dict)   # extra numbers for results.json

    @property
    def ratio(self) -> float | None:
        return self.swarm / self.baseline if self.baseline else None


def timed_figure(section: str, name: str, unit: str, swarm: list[float], local: list[float],
                 amount: float | None = None, baseline_name: str = "local", note: str = "") -> Figure:
    """A figure from wall times (seconds): medians, their noise and the best-of-N ratio.

    With `amount` the figure is a rate (amount / time, e.g. tokens/s); otherwise a time in `unit`.
    """
    if amount is None:
        scale = 1e3 if unit == "ms" else 1.0
        value, base, best = scale * median(swarm), scale * median(local), min(swarm) / min(local)
    else:
        value, base, best = amount / median(swarm), amount / median(local), min(local) / min(swarm)
    return Figure(section, name, unit, value, base, baseline_name, spread(swarm, local), note, best)


# ---- timing -------------------------------------------------------------------------------------


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Wall times of each function, run in turns so that all of them see the same background load."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(*samples: list[float]) -> float:
    """The larger relative interquartile range of the sample sets: how noisy the medians are."""
    worst = 0.0
    for xs in samples:
        if len(xs) >= 2:
            q = statistics.quantiles(xs, n=4, method="inclusive")
            worst = max(worst, (q[2] - q[0]) / statistics.median(xs))
    return worst


# ---- models and swarms --------------------------------------------------------------------------


class Bench:
    """The models, swarms and clients of one benchmark run; everything it starts is stopped on exit."""

    def __init__(self, plan: Plan, out: str):
        self.plan, self.out = plan, out
        os.makedirs(out, exist_ok=True)
        self._stack = contextlib.ExitStack()
        self._swarms: dict[str, LocalSwarm] = {}
        self._clients: dict[tuple, SwarmForCausalLM] = {}

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def model(self, hidden: int) -> str:
        """A tiny llama of this width (random weights, fixed seed), written once per output folder."""
        path = os.path.join(self.out, "models", f"bench-llama-{self.plan.layers}-{hidden}")
        if not os.path.exists(os.path.join(path, "config.json")):
            make_tiny_model("llama", path, layers=self.plan.layers, hidden=hidden, seed=SEED, max_shard_size="64MB")
        return path

    def swarm(self, path: str) -> LocalSwarm:
        """The loopback swarm of `path` (three servers), started on first use."""
        if path not in self._swarms:
            logs = os.path.join(self.out, "logs", os.path.basename(path))
            os.makedirs(logs, exist_ok=True)
            self._swarms[path] = self._stack.enter_context(
                LocalSwarm(path, spans=SPANS, log_dir=logs, throughput=1.0))
        return self._swarms[path]

    def client(self, path: str, **config) -> SwarmForCausalLM:
        """A client of the loopback swarm of `path`; `config` overrides ClientConfig fields."""
        key = (path, tuple(sorted(config.items())))
        if key not in self._clients:
            swarm = self.swarm(path)
            client = connect(path, swarm.initial_peers, **config)
            self._stack.callback(client.close)
            self._clients[key] = client
        return self._clients[key]


def connect(path: str, initial_peers: list[str], **config) -> SwarmForCausalLM:
    client = SwarmForCausalLM.from_pretrained(path, initial_peers=initial_peers,
                                              client_config=ClientConfig(**config))
    return client.eval()


def rpc_rtt(client, swarm: LocalSwarm, calls: int = 10) -> float:
    """Median round trip of the servers' smallest RPC (info): the network RTT plus the software stack's."""
    data, times = wire.pack({}), []
    conn = client.connection
    for server in (s for s in swarm.servers if s.proc.poll() is None):
        for _ in range(calls):
            began = time.perf_counter()
            conn.run(transport.call(conn.p2p, server.peer_id, "info", data, 10.0), timeout=15.0)
            times.append(time.perf_counter() - began)
    return median(times)


def step_design(session, hidden_size: int) -> str:
    """How `session` runs a single-token step now: chained server to server, or relayed by the client.

    The client decides per step from its measured RTTs, so the benchmark asks it rather than guess.
    """
    token = torch.zeros(session.batch_size, 1, hidden_size)
    return "server-chained" if session.chainable(token) else "client-driven"


def local_model(path: str):
    """The same checkpoint as a plain local transformers model: the baseline of every figure."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()


def token_ids(vocab_size: int, batch: int, length: int, seed: int = SEED) -> torch.Tensor:
    return torch.randint(3, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- reports ------------------------------------------------------------------------------------


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def figures_table(figures: list[Figure]) -> str:
    rows = [[f.name, f"{fmt(f.swarm)} {f.unit}", f"{fmt(f.baseline)} ({f.baseline_name})" if f.baseline else "-",
             fmt(f.ratio), fmt(f.best_ratio), f"±{100 * f.noise:.0f}%", f.note] for f in figures]
    return markdown_table(["figure", "swarm", "baseline (same run)", "swarm/baseline", "best-of-N ratio", "noise",
                           "note"], rows)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "gpu": torch.cuda.is_available(),
            "load_average": os.getloadavg()}


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))


def parse_args(description: str, default_out: str, argv: list[str] | None = None) -> argparse.Namespace:
    """--quick / --smoke / --out; the namespace gains `plan`, the Plan of the chosen mode."""
    p = argparse.ArgumentParser(description=description)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, loopback only: a few minutes on 2 cores")
    mode.add_argument("--smoke", action="store_true", help="the smallest sizes: what CI runs so this code cannot rot")
    p.add_argument("--out", default=default_out, help="folder for results, logs and the tiny models")
    args = p.parse_args(argv)
    args.plan = PLANS["quick" if args.quick else "smoke" if args.smoke else "full"]
    return args


def run_section(run: Callable[[Bench], list], table: Callable[[list], str], description: str, name: str,
                argv: list[str] | None = None) -> None:
    """`python -m benchmarks.<name>`: one section on its own, with run.py's flags, printed as a table."""
    args = parse_args(description, f"benchmarks/results/{name}", argv)
    with shutdown.stopped_by_signals(), single_threaded(), Bench(args.plan, args.out) as bench:
        print(table(run(bench)))


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Client and local baseline get one torch thread, like each server: the comparison is per core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
