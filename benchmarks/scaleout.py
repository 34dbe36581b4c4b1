"""Training that outgrows one client: samples/s of several client processes on one swarm, beside one.

    python -m benchmarks.scaleout [--quick | --smoke]

Every run is `python -m swarmtune.train` (the tiny_local recipe's LoRA, batch 4) against the
benchmark's loopback swarm: one client process (the baseline), 2 with Lightning's DDP (and 4 where
the machine has 8 cores or more), and, except in --smoke, a collaboration of 2 peers
(hivemind.Optimizer, target batch 1024). Start-up (imports, swarm connection, DDP or DHT set-up)
is measured by a run of the same configuration that stops at its first step or epoch, and taken
off: samples/s = (samples of the long run - of the short one) / (its time - the short one's); --smoke
only checks that everything runs and divides by the whole wall time. Every process has one torch
thread (OMP_NUM_THREADS=1), as the other sections' processes do.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from benchmarks.common import Bench, Figure, figures_table, run_section
from swarmtune.local_swarm import ManagedProcess

SECTION = "scaleout"
BATCH = 4
# The collaboration's samples per optimizer step: an epoch of ~15 s of the peers' compute here, long beside the
# 2 s of matchmaking that hivemind schedules before it ends (real collaborations use epochs of minutes)
TARGET = 1024
STEPS = {"full": 200, "quick": 80, "smoke": 8}  # enough that start-up noise stays small beside them
EPOCHS = {"full": 8, "quick": 4}


def train_seconds(args: list[str], log: str, timeout: float = 600.0) -> float:
    """Wall time of one training process (with everything it starts), which must succeed."""
    began = time.perf_counter()
    process = _start(args, log)
    try:
        process.proc.wait(timeout)
    finally:
        process.kill()
    if process.proc.returncode != 0:
        raise RuntimeError(f"training failed ({process.proc.returncode}); see {log}")
    return time.perf_counter() - began


def peers_override(key: str, peers: list[str]) -> str:
    return f"{key}=[" + ",".join(f"'{p}'" for p in peers) + "]"


def run(bench: Bench) -> list[Figure]:
    plan = bench.plan.name
    path = bench.model(bench.plan.latency_hidden)
    swarm = bench.swarm(path)
    logs = os.path.join(bench.out, "logs", SECTION)
    os.makedirs(logs, exist_ok=True)
    common = ["recipe=tiny_local", f"model.path={path}", peers_override("swarm.initial_peers", swarm.initial_peers),
              "logger=none", "generate_every_n_val=0", "trainer.val_check_interval=100000",
              "trainer.checkpoint.every_n_train_steps=100000", f"data.batch_size={BATCH}"]
    steps = STEPS[plan]

    def rate(name: str, extra: list[str], processes: int) -> tuple[float, float]:
        """(samples/s, seconds of the long run) of `processes` DDP ranks (or one process)."""
        seconds = {1: 0.0}
        for n in (1, steps) if plan != "smoke" else (steps,):
            with tempfile.TemporaryDirectory(prefix="swarmtune-scaleout-") as out:
                args = [*common, *extra, f"trainer.max_steps={n}", f"hydra.run.dir={out}"]
                seconds[n] = train_seconds(args, os.path.join(logs, f"{name}-{n}.log"))
        counted = steps - 1 if plan != "smoke" else steps
        return counted * BATCH * processes / (seconds[steps] - seconds[1]), seconds[steps]

    single, single_s = rate("single", [], 1)
    counts = [2] + ([4] if (os.cpu_count() or 1) >= 8 else [])
    figures = []
    for n in counts:
        value, seconds = rate(f"ddp{n}", [f"trainer.devices={n}", "trainer.strategy=ddp"], n)
        figures.append(Figure(SECTION, f"{n} client processes, DDP", "samples/s", value, single,
                              "one client process", note=f"{steps} steps of batch {BATCH} per rank",
                              details={"processes": n, "seconds": seconds, "baseline_seconds": single_s}))
    if plan in EPOCHS:
        value, seconds = collab_rate(common, EPOCHS[plan], logs)
        figures.append(Figure(SECTION, "2 collaborating peers (hivemind.Optimizer)", "samples/s", value, single,
                              "one client process",
                              note=f"{EPOCHS[plan]} collaboration epochs of {TARGET} samples, batch {BATCH} per peer",
                              details={"processes": 2, "seconds": seconds}))
    return figures


def collab_rate(common: list[str], epochs: int, logs: str) -> tuple[float, float]:
    """Samples/s of two peers that meet on a bootstrap DHT of this process: epochs x target over the time
    between a collaboration of 1 epoch and one of `epochs`."""
    import hivemind

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False,
                       use_relay=False, use_auto_relay=False)
    try:
        bootstrap = [str(a) for a in dht.get_visible_maddrs()]
        seconds = {}
        for n in (1, epochs):
            args = [*common, f"collab.run_id=scaleout-{n}", f"collab.target_batch_size={TARGET}",
                    f"collab.epochs={n}", "collab.matchmaking_time=2.0", "collab.averaging_timeout=30",
                    "trainer.max_steps=100000", peers_override("collab.initial_peers", bootstrap)]
            with tempfile.TemporaryDirectory(prefix="swarmtune-scaleout-") as out:
                began = time.perf_counter()
                peers = [_start([*args, f"hydra.run.dir={out}/{peer}"], os.path.join(logs, f"collab{n}-{peer}.log"))
                         for peer in "ab"]
                try:
                    for peer in peers:
                        peer.proc.wait(600)
                finally:
                    for peer in peers:
                        peer.kill()
                if any(peer.proc.returncode != 0 for peer in peers):
                    raise RuntimeError(f"a collaborating peer failed; see {logs}/collab{n}-*.log")
                seconds[n] = time.perf_counter() - began
        return (epochs - 1) * TARGET / (seconds[epochs] - seconds[1]), seconds[epochs]
    finally:
        dht.shutdown()


def _start(args: list[str], log: str) -> ManagedProcess:
    """`python -m swarmtune.train ARGS`; its `kill()` takes everything it started down with it."""
    return ManagedProcess([sys.executable, "-m", "swarmtune.train", *args], log,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def scaleout_table(figures: list[Figure]) -> str:
    return figures_table(figures)


if __name__ == "__main__":
    run_section(run, scaleout_table, __doc__, SECTION)
