"""Load balancing end to end: measured throughput, the simulation, and real servers choosing their spans."""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from benchmarks.balance_sim import Params, simulate, summarize
from swarmtune.client.config import ClientConfig
from swarmtune.client.connection import SwarmConnection
from swarmtune.server import throughput
from swarmtune.swarm import LocalSwarm
from swarmtune.tiny_model import tiny_config


def test_throughput_is_measured_once_per_configuration(tmp_path, monkeypatch):
    config = tiny_config("llama", layers=2)
    config._attn_implementation = "sdpa"
    first = throughput.get_throughput(config, torch.float32, "cpu", cache_dir=str(tmp_path))
    assert first.forward > 0 and first.inference > 0

    def no_benchmark(*args):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(throughput, "measure", no_benchmark)
    assert throughput.get_throughput(config, torch.float32, "cpu", cache_dir=str(tmp_path)) == first
    assert throughput.cache_key(config, torch.float32, "cpu") != throughput.cache_key(config, torch.bfloat16, "cpu")


def test_blocks_that_fit_leave_room_for_the_cache():
    config = tiny_config("llama", layers=12)
    assert throughput.blocks_that_fit(config, torch.float32, "cpu", "none", reserve_bytes=0) == 12
    assert throughput.blocks_that_fit(config, torch.float32, "cpu", "none", reserve_bytes=1 << 60) == 0


def test_simulated_swarm_stays_near_the_bound_through_churn():
    params = Params(servers=80, duration=2400.0, warmup=600.0, churn=0.1, seed=1)
    balanced = summarize(simulate(params))
    random_spans = summarize(simulate(replace(params, policy="random")))
    assert balanced["holes"] == 0
    assert balanced["mean"] > 0.7 > random_spans["mean"]
    assert balanced["planner"] > 0.9


def test_simulated_crash_burst_is_recovered():
    result = simulate(Params(servers=12, churn=0.0, burst=0.3, duration=3600.0, warmup=600.0, seed=2))
    assert result.bursts and all(burst[1] is not None for burst in result.bursts)


def test_servers_without_blocks_cover_the_model_and_recover_from_a_crash(tiny_models, tmp_path):
    """4 servers x 4 blocks choose their spans on a 12-block model; after one dies, 3 x 4 must tile it exactly."""
    model = tiny_models("llama", layers=12)
    options = dict(num_blocks=4, update_period=1.0, expiration=4.0, balance_period=2.0,
                   throughput_cache=str(tmp_path / "cache"))
    with LocalSwarm(model, spans=[None] * 4, log_dir=str(tmp_path), **options) as swarm:
        client = SwarmConnection(ClientConfig(initial_peers=swarm.initial_peers, refresh_period=1.0),
                                 swarm.dht_prefix)
        try:
            _wait_until(lambda: not _holes(client), 60, "the servers to cover every block", swarm)
            victim = _sole_holder(swarm, client)
            victim.kill()
            began = time.monotonic()
            _wait_until(lambda: victim.peer_id not in client.view.servers and not _holes(client), 90,
                        "the 3 remaining servers to cover every block again", swarm)
            print(f"coverage restored {time.monotonic() - began:.1f} s after the crash")
            assert sorted(s.span for s in client.view.servers.values()) == [(0, 4), (4, 8), (8, 12)]
        finally:
            client.close()


def _sole_holder(swarm: LocalSwarm, client: SwarmConnection):
    """A server whose death leaves blocks without a server: the most such blocks."""
    spans = {peer: s.span for peer, s in client.view.servers.items()}

    def sole_blocks(peer: str) -> int:
        start, end = spans[peer]
        return sum(all(not a <= b < e for other, (a, e) in spans.items() if other != peer) for b in range(start, end))

    return max((p for p in swarm.servers if p.peer_id in spans), key=lambda p: sole_blocks(p.peer_id))


def _holes(client: SwarmConnection) -> list[int]:
    client.refresh()
    return client.view.uncovered(0, client.view.num_blocks)


def _wait_until(condition, timeout: float, what: str, swarm: LocalSwarm) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n\n".join(server.tail(15) for server in swarm.servers)
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(0.5)
