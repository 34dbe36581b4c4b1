"""Load test: K concurrent clients (generation sessions and LoRA training steps) against a loopback swarm.

    python -m benchmarks.load [--clients 8] [--duration 60] [--out DIR]

Each client is its own process with its own libp2p daemon, as separate users would be. Reports
p50/p99 latency per operation, errors, and the servers' memory over time (it should stay flat:
sessions and adapters are freed when clients finish with them). Exits non-zero on any error.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import psutil

from swarmtune import shutdown

HIDDEN = 64


def client_loop(kind: str, peers: list[str], prefix: str, model: str, seconds: float, seed: int, queue) -> None:
    """Run operations of one kind until the time is up; report (kind, latencies, errors)."""
    import torch

    from swarmtune.adapters.lora import ClientLora, target_shapes
    from swarmtune.client.config import ClientConfig
    from swarmtune.client.connection import SwarmConnection
    from swarmtune.client.inference import InferenceSession
    from swarmtune.client.sequential import RemoteSequential
    from swarmtune.models import load_config

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    latencies, errors = [], []
    conn = SwarmConnection(ClientConfig(initial_peers=peers), prefix)
    try:
        remote = RemoteSequential(conn)
        lora = ClientLora(target_shapes(load_config(model), ["q_proj", "v_proj"]), rank=4)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if kind == "generation":
                    with InferenceSession(conn, max_length=64, batch_size=1) as session:
                        session.step(torch.randn(1, 8, HIDDEN))
                        for _ in range(16):
                            began = time.perf_counter()
                            session.step(torch.randn(1, 1, HIDDEN))
                            latencies.append(time.perf_counter() - began)
                else:
                    began = time.perf_counter()
                    x = torch.randn(2, 16, HIDDEN, requires_grad=True)
                    remote(x, lora=lora).square().mean().backward()
                    latencies.append(time.perf_counter() - began)
            except Exception as e:  # counted and reported: the benchmark's verdict is zero errors
                errors.append(f"{type(e).__name__}: {e}")
    finally:
        conn.close()
    queue.put((kind, latencies, errors))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run(clients: int, seconds: float, out_dir: str) -> dict:
    from swarmtune.local_swarm import LocalSwarm
    from swarmtune.tiny_model import make_tiny_model

    model = make_tiny_model("llama", os.path.join(out_dir, "tiny-llama"))
    with LocalSwarm(model, spans=[(0, 3), (3, 6)], log_dir=os.path.join(out_dir, "swarm")) as swarm:
        servers = [psutil.Process(s.pid) for s in swarm.servers]
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        kinds = ["generation" if i % 2 == 0 else "training" for i in range(clients)]
        procs = [ctx.Process(target=client_loop, args=(kind, swarm.initial_peers, swarm.dht_prefix, model,
                                                       seconds, i, queue)) for i, kind in enumerate(kinds)]
        for p in procs:
            p.start()
        memory, began = [], time.monotonic()
        while time.monotonic() - began < seconds + 5 and any(p.is_alive() for p in procs):
            memory.append((round(time.monotonic() - began, 1), [s.memory_info().rss for s in servers]))
            time.sleep(1.0)
        results = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return summarize(results, memory, clients, seconds)


def summarize(results: list, memory: list, clients: int, seconds: float) -> dict:
    report = {"clients": clients, "seconds": seconds, "operations": {}, "errors": []}
    for kind in ("generation", "training"):
        lat = [x for k, values, _ in results if k == kind for x in values]
        report["operations"][kind] = {"count": len(lat), "p50_ms": 1e3 * percentile(lat, 0.5),
                                      "p99_ms": 1e3 * percentile(lat, 0.99),
                                      "mean_ms": 1e3 * statistics.fmean(lat) if lat else float("nan")}
    report["errors"] = [e for _, _, errors in results for e in errors]
    warm = memory[min(len(memory) - 1, 5)][1] if memory else []
    report["server_rss_mb"] = {
        "after_warmup": [round(m / 2**20, 1) for m in warm],
        "end": [round(m / 2**20, 1) for m in memory[-1][1]] if memory else [],
        "max": [round(max(row[1][i] for row in memory) / 2**20, 1) for i in range(len(warm))],
    }
    report["rss_timeline"] = [(t, [round(m / 2**20, 1) for m in rss]) for t, rss in memory]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out_dir = args.out or tempfile.mkdtemp(prefix="swarmtune-load-")
    os.makedirs(out_dir, exist_ok=True)
    report = run(args.clients, args.duration, out_dir)
    with open(os.path.join(out_dir, "load.json"), "w") as f:
        json.dump(report, f, indent=2)
    print("| operation | count | p50 ms | p99 ms |\n|---|---|---|---|")
    for kind, ops in report["operations"].items():
        print(f"| {kind} | {ops['count']} | {ops['p50_ms']:.1f} | {ops['p99_ms']:.1f} |")
    rss = report["server_rss_mb"]
    print(f"errors: {len(report['errors'])}; server RSS MiB after warm-up {rss['after_warmup']}, "
          f"end {rss['end']}, max {rss['max']}; results in {out_dir}/load.json")
    raise SystemExit(1 if report["errors"] else 0)


if __name__ == "__main__":
    with shutdown.stopped_by_signals():  # SIGTERM, as Ctrl-C, stops the swarm's servers before we go
        main()
