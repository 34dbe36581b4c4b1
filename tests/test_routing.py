"""Routing over the swarm view with measured speeds and round trips, and the pings that measure them."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import torch

from swarmtune.client.bans import Bans
from swarmtune.client.config import ClientConfig
from swarmtune.client.connection import SwarmConnection
from swarmtune.client.routing import inference_route, training_route
from swarmtune.client.span_requests import all_finite
from swarmtune.directory import SwarmView
from swarmtune.records import ServerInfo


def view(*servers: ServerInfo, num_blocks: int = 8) -> SwarmView:
    return SwarmView(num_blocks, {s.peer_id: s for s in servers})


def server(name: str, start: int, end: int, throughput: float = 100.0, rps: float = 10.0) -> ServerInfo:
    return ServerInfo(name, start, end, throughput=throughput, inference_rps=rps)


def peers(hops) -> list[str]:
    return [hop.peer_id for hop in hops]


def test_inference_prefers_the_nearer_of_two_equal_servers():
    swarm = view(server("near", 0, 8), server("far", 0, 8))
    rtts = {"near": 0.005, "far": 0.1}
    assert peers(inference_route(swarm, 0, 8, rtt=rtts.get)) == ["near"]
    rtts = {"near": 0.1, "far": 0.005}
    assert peers(inference_route(swarm, 0, 8, rtt=rtts.get)) == ["far"]


def test_inference_prefers_the_faster_of_two_equally_near_servers():
    swarm = view(server("slow", 0, 8, rps=2.0), server("fast", 0, 8, rps=20.0))
    assert peers(inference_route(swarm, 0, 8, rtt={"slow": 0.01, "fast": 0.01}.get)) == ["fast"]


def test_inference_weighs_network_against_compute():
    # "far" computes a step in 5 ms but is 200 ms away; "near" takes 50 ms and is 5 ms away
    swarm = view(server("far", 0, 8, rps=200.0), server("near", 0, 8, rps=20.0))
    assert peers(inference_route(swarm, 0, 8, rtt={"far": 0.2, "near": 0.005}.get)) == ["near"]
    assert peers(inference_route(swarm, 0, 8, rtt={"far": 0.01, "near": 0.005}.get)) == ["far"]


def test_inference_avoids_extra_hops_when_round_trips_dominate():
    swarm = view(server("whole", 0, 8, rps=10.0), server("a", 0, 4, rps=25.0), server("b", 4, 8, rps=25.0))
    rtts = {"whole": 0.05, "a": 0.05, "b": 0.05}
    assert peers(inference_route(swarm, 0, 8, rtt=rtts.get)) == ["whole"]
    rtts = {"whole": 0.001, "a": 0.001, "b": 0.001}
    assert peers(inference_route(swarm, 0, 8, rtt=rtts.get)) == ["a", "b"]


def test_unmeasured_servers_count_as_typical():
    swarm = view(server("near", 0, 8), server("far", 0, 8), server("unknown", 0, 8))
    rtts = {"near": 0.01, "far": 0.03}
    assert peers(inference_route(swarm, 0, 8, rtt=rtts.get)) == ["near"]
    bans = Bans()
    bans.ban("near")
    assert peers(inference_route(swarm, 0, 8, bans, rtt=rtts.get)) == ["unknown"]  # as if 0.02 s away


def test_training_prefers_faster_servers_in_proportion():
    swarm = view(server("slow", 0, 8, throughput=100.0), server("fast", 0, 8, throughput=300.0))
    assert peers(training_route(swarm, 0, 8, randomness=0)) == ["fast"]
    rng = random.Random(0)
    picks = Counter(training_route(swarm, 0, 8, rng=rng)[0].peer_id for _ in range(400))
    assert 0.65 < picks["fast"] / 400 < 0.85  # weights 3:1 -> 0.75


def test_the_connection_measures_round_trips_to_every_server(llama_swarm):
    connection = SwarmConnection(ClientConfig(initial_peers=llama_swarm.initial_peers, refresh_period=0.5),
                                 llama_swarm.dht_prefix)
    try:
        deadline = time.monotonic() + 30
        while len(connection.rtts) < len(llama_swarm.servers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert set(connection.rtts) == {s.peer_id for s in llama_swarm.servers}
        assert all(0 < rtt < 1.0 for rtt in connection.rtts.values()), connection.rtts
    finally:
        connection.close()


def test_a_ping_keeps_the_median_for_routing_and_the_fastest_for_the_link():
    """One slow round trip (a busy moment of either side) must not make a near server look far."""
    connection = SwarmConnection.__new__(SwarmConnection)  # no network: only the ping's bookkeeping
    connection.rtts, connection.min_rtts, connection._pinged = {}, {}, {}
    timed = iter([0.5, 0.009, 0.001, 0.004])  # the first call dials; three samples follow

    async def time_info(peer_id: str) -> float:
        return next(timed)

    connection._time_info = time_info
    asyncio.run(connection._ping("peer", asyncio.Semaphore(1)))
    assert connection.rtts == {"peer": 0.004} and connection.min_rtts == {"peer": 0.001}


def test_failed_server_stays_out_until_it_announces_again():
    """A dead server's record outlives it: after its ban, it is still skipped until a newer record appears."""
    import time

    from swarmtune.client.bans import Bans

    bans = Bans(base=0.01)
    bans.ban("peer", record_expires=100.0)
    time.sleep(0.05)
    assert bans.banned("peer", 100.0)       # the same (old) record: still out
    assert not bans.banned("peer", 130.0)   # it announced itself again
    assert not bans.banned("peer")          # callers without records see the timed ban only
    bans.forgive("peer")
    assert not bans.banned("peer", 100.0)


def test_all_finite_finds_nan_and_infinities_anywhere():
    """The client's check of servers' outputs, as cheap as one min/max pass: it must still see one bad value."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        good = torch.randn(2, 3, 64).to(dtype)
        assert all_finite(good) and all_finite(good[:0])
        for bad in (float("nan"), float("inf"), float("-inf")):
            for index in (0, 100, good.numel() - 1):
                t = good.clone()
                t.view(-1)[index] = bad
                assert not all_finite(t), (dtype, bad, index)
