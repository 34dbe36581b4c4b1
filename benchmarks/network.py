"""The paper's network settings, emulated: measured inference steps/s and forward tokens/s beside a simple bound.

Each server runs in its own network namespace (scripts/netem.py: links with a rate and a delay,
all on this machine, created and removed here); the bootstrap peer and the client stay in the root
namespace. The bound is what a design allows on that network with zero software overhead: its
critical path's one-way trips x RTT/2, plus the bytes on that path / bandwidth, plus compute (the
local model's own time for the same work, measured in the same run):

    client-driven (forward/backward; inference without chaining): 2 x hops trips, input and output per hop
    server-chained (inference steps pushed server to server):     hops + 1 trips, one activation each

The gap between measured and bound is split into what loopback already costs beyond its bound
(the software stack: libp2p daemons, serialisation, event loops; same run), an estimate of the
libp2p stream window's growth on a long path (every RPC opens a yamux stream whose flow-control
window starts at 256 KiB and doubles per round trip, so a larger message waits extra RTTs), and the
rest (the emulator's own delays, noise).

    python -m benchmarks.network [--quick | --smoke] [--out DIR]     (full mode only runs the settings)
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from benchmarks.common import (
    SPANS,
    Bench,
    Figure,
    Plan,
    Setting,
    connect,
    fmt,
    interleaved,
    local_model,
    markdown_table,
    median,
    rpc_rtt,
    run_section,
    seed_everything,
    spread,
    step_design,
    token_ids,
)
from benchmarks.inference import timed_generate
from benchmarks.serving import forward_step
from swarmtune import wire
from swarmtune.local_swarm import LocalSwarm

SECTION = "network"
NETEM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "netem.py")


def client_driven(hops: int, request: float, reply: float) -> tuple[int, list[float]]:
    """The client sends every span its input and waits for its output before the next one."""
    return 2 * hops, [request, reply] * hops


def server_chained(hops: int, request: float, reply: float) -> tuple[int, list[float]]:
    """The client sends the step to the first server; each server pushes its output to the next; the last
    replies (the others' replies to the client, for its cache, are off the critical path)."""
    return hops + 1, [max(request, reply)] * (hops + 1)


# a design -> (one-way trips, bytes of each transfer) on the critical path of one call through `hops` servers
DESIGNS: dict[str, Callable[[int, float, float], tuple[int, list[float]]]] = {
    "client-driven": client_driven, "server-chained": server_chained}


def bound(design: str, hops: int, rtt: float, rate: float | None, request: float, reply: float,
          compute: float) -> float:
    """Seconds per call that `design` allows with no software overhead at all."""
    trips, transfers = DESIGNS[design](hops, request, reply)
    return trips * rtt / 2 + (sum(transfers) * 8 / rate if rate else 0.0) + compute


def available() -> str | None:
    """Why network emulation cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10).returncode != 0:
        return "`ip netns` does not work here"
    return None


@contextlib.contextmanager
def emulated(setting: Setting, nodes: int, timeout: float = 60.0) -> Iterator[dict]:
    """Namespaces and links of `setting` for `nodes` servers; yields scripts/netem.py's description of them."""
    proc = subprocess.Popen([sys.executable, NETEM, "up", "--nodes", str(nodes), "--rate-mbit", str(setting.rate_mbit),
                             "--rtt-ms", str(setting.rtt_ms)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        yield _wait_ready(proc, timeout)
    finally:
        proc.stdin.close()   # the emulator tears everything down when its stdin closes
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        subprocess.run([sys.executable, NETEM, "down"], capture_output=True, timeout=60)


def _wait_ready(proc: subprocess.Popen, timeout: float) -> dict:
    deadline, lines = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stdout.readline() if ready else ""
        if line.startswith("READY "):
            return json.loads(line.split(" ", 1)[1])
        lines.append(line)
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"network emulation did not start within {timeout:.0f} s:\n{''.join(lines)}")


@contextlib.contextmanager
def swarm_for(bench: Bench, setting: Setting, path: str, label: str) -> Iterator[LocalSwarm]:
    """The run's own loopback swarm for loopback; for an emulated setting, three servers each in its own
    namespace of a fresh network, the bootstrap peer at the root namespace's address."""
    if setting.rate_mbit is None:
        yield bench.swarm(path)
        return
    log_dir = os.path.join(bench.out, "logs", label)
    os.makedirs(log_dir, exist_ok=True)
    with emulated(setting, len(SPANS)) as net:
        root, *nodes = net["nodes"]
        per_server = [{"host": n["address"], "wrap": ["ip", "netns", "exec", n["namespace"]]} for n in nodes]
        with LocalSwarm(path, spans=SPANS, log_dir=log_dir, throughput=1.0, host=root["address"],
                        per_server=per_server) as swarm:
            yield swarm


def step_message_bytes(hidden: int) -> tuple[int, int]:
    """Bytes of one single-token inference step's request and reply, as the client and server encode them."""
    one = torch.ones(1, 1, dtype=torch.long)
    request = wire.pack({"step": 0}, {"hidden": torch.zeros(1, 1, hidden), "attention_mask": one, "position_ids": one})
    return len(request), len(wire.pack({}, {"hidden": torch.zeros(1, 1, hidden)}))


def window_round_trips(nbytes: float, initial: int = 256 << 10) -> int:
    """Round trips beyond the first that a fresh libp2p (yamux) stream needs to carry `nbytes`: its
    flow-control window starts at 256 KiB (the yamux spec) and auto-tuning doubles it per round trip."""
    window, sent, rounds = initial, 0.0, 0
    while sent + window < nbytes:
        sent, window, rounds = sent + window, 2 * window, rounds + 1
    return rounds


@dataclass
class Measured:
    """Swarm and local times of one piece of work in one setting, and what each hop carried."""

    what: str
    unit: str
    design: str                 # a key of DESIGNS: the path each call takes
    amount: float               # tokens (forward) or 1 (an inference step)
    swarm: list[float]
    local: list[float]
    request: float              # bytes to each server per call
    reply: float


def network_figure(setting: Setting, m: Measured, measured_rtt: float,
                   loopback_gap: dict[str, float]) -> Figure:
    """`m` beside the design's bound, with the gap split into software stack (the loopback figure's gap,
    same run), stream window growth on a long path (an estimate), and what neither explains."""
    hops, rtt = len(SPANS), setting.rtt_ms / 1e3
    rate = setting.rate_mbit * 1e6 if setting.rate_mbit else None
    took, compute = median(m.swarm), median(m.local)
    limit = bound(m.design, hops, rtt, rate, m.request, m.reply, compute)
    if setting.rate_mbit is None:
        loopback_gap[m.what] = took - limit
    stack = loopback_gap.get(m.what, 0.0)
    window = 0.0 if rate is None else \
        rtt * sum(window_round_trips(b) for b in DESIGNS[m.design](hops, m.request, m.reply)[1])
    explained = limit + stack + window
    best = bound(m.design, hops, rtt, rate, m.request, m.reply, min(m.local)) / min(m.swarm)
    note = (f"{1e3 * took:.1f} ms measured; bound {1e3 * limit:.1f} ms (compute {1e3 * compute:.1f}); "
            f"+ stack {1e3 * stack:.1f} + stream window {1e3 * window:.0f} = {1e3 * explained:.1f} ms; "
            f"info RPC RTT {1e3 * measured_rtt:.1f} ms")
    figure = Figure(SECTION, f"{setting.name}: {m.what}", m.unit, m.amount / took, m.amount / limit,
                    f"bound ({m.design})", spread(m.swarm, m.local), note, best)
    figure.details = {"setting": setting.name, "what": m.what, "rate_mbit": setting.rate_mbit,
                      "rtt_ms": setting.rtt_ms, "measured_rpc_rtt_ms": 1e3 * measured_rtt, "hops": hops,
                      "design": m.design, "seconds": took, "bound_seconds": limit, "compute_seconds": compute,
                      "stack_seconds": stack, "window_seconds": window, "explained_seconds": explained,
                      "request_bytes": m.request, "reply_bytes": m.reply}
    return figure


def measure_inference(client, local, plan: Plan) -> Measured:
    ids = token_ids(local.config.vocab_size, 1, plan.prompt)
    hidden = local.config.hidden_size
    swarm_steps, local_steps, designs = [], [], []
    for i in range(plan.warmup + plan.net_repeats):
        with client.inference_session(plan.prompt + plan.new_tokens) as session:
            steps = timed_generate(client, ids, plan.new_tokens)[1]
            design = step_design(session, hidden)
        if i >= plan.warmup:
            swarm_steps.append(median(steps))
            local_steps.append(median(timed_generate(local, ids, plan.new_tokens)[1]))
            designs.append(design)
    design = max(set(designs), key=designs.count)  # the client may switch as its RTT estimates move
    return Measured("inference steps/s, batch 1", "steps/s", design, 1.0, swarm_steps, local_steps,
                    *step_message_bytes(hidden))


def measure_forward(client, local, plan: Plan, shape: tuple[int, int]) -> Measured:
    ids = token_ids(local.config.vocab_size, *shape)
    stats = client.remote.replayer.stats
    sent, received, requests = stats.bytes_sent, stats.bytes_received, stats.requests
    t = interleaved({"local": forward_step(local, ids), "swarm": forward_step(client, ids)},
                    plan.net_repeats, plan.warmup)
    calls = stats.requests - requests
    header = len(wire.pack({}, {"hidden": torch.zeros(1)})) - 4   # replies are counted as tensor bytes only
    request, reply = (stats.bytes_sent - sent) / calls, (stats.bytes_received - received) / calls + header
    return Measured(f"forward tokens/s, batch {shape[0]}x{shape[1]}", "tokens/s", "client-driven",
                    shape[0] * shape[1], t["swarm"], t["local"], request, reply)


def setting_figures(setting: Setting, swarm: LocalSwarm, path: str, local, plan: Plan,
                    loopback_gap: dict[str, float]) -> list[Figure]:
    """Inference steps/s and forward tokens/s in one setting, each beside its bound.

    `loopback_gap` maps a figure to the seconds loopback takes beyond its bound: the loopback
    setting (run first) fills it, and the emulated settings use it to explain their own gap.
    """
    client = connect(path, swarm.initial_peers)
    try:
        rtt = rpc_rtt(client, swarm)
        measured = [measure_inference(client, local, plan)]
        measured += [measure_forward(client, local, plan, shape) for shape in plan.forward_shapes]
    finally:
        client.close()
    return [network_figure(setting, m, rtt, loopback_gap) for m in measured]


def network_table(figures: list[Figure]) -> str:
    """The compact view: measured beside the bound and beside what the gap model explains."""
    rows = []
    for f in figures:
        d = f.details
        rows.append([d["setting"], d["what"], fmt(f.swarm), fmt(f.baseline), d["design"], f"{f.ratio:.2f}",
                     f"{f.best_ratio:.2f}", fmt(f.swarm * d["seconds"] / d["explained_seconds"]),
                     f"{d['rtt_ms']:g} / {d['measured_rpc_rtt_ms']:.1f}", f"±{100 * f.noise:.0f}%"])
    return markdown_table(["setting", "figure", "measured", "bound", "design", "measured/bound", "best-of-N",
                           "bound+stack+window", "RTT set / info RPC (ms)", "noise"], rows)


def run(bench: Bench) -> list[Figure]:
    seed_everything()
    if not bench.plan.settings:
        return []
    path = bench.model(bench.plan.wide_hidden)
    local = local_model(path)
    unavailable = available()
    loopback_gap: dict[str, float] = {}
    figures = []
    with torch.no_grad():
        for i, setting in enumerate(bench.plan.settings):
            if setting.rate_mbit is not None and unavailable:
                print(f"skipping {setting.name}: {unavailable}", file=sys.stderr)
                continue
            with swarm_for(bench, setting, path, f"network-{i}") as swarm:
                figures += setting_figures(setting, swarm, path, local, bench.plan, loopback_gap)
    return figures


def main(argv: list[str] | None = None) -> None:
    run_section(run, network_table, __doc__, "network", argv)


if __name__ == "__main__":
    main()
