"""The benchmark suite runs end to end (smoke sizes) and its pieces compute what they claim.

The smoke run starts real loopback swarms, kills servers and writes every output, so the
benchmark code cannot rot; the emulated-network test runs only where namespaces and TUN work.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from benchmarks.attackers import header_bombs
from benchmarks.hostile import p99
from benchmarks.network import bound, window_round_trips
from benchmarks.step import HOP_PARTS, RETURN, hop_parts
from scripts import netem
from swarmtune import wire
from tests.helpers import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # the benchmarks' own smoke run, minutes
def test_smoke_run_writes_sane_results(tmp_path):
    out = tmp_path / "results"
    # run() kills the swarm processes the benchmarks start, too, should the run fail or overrun
    proc = run("benchmarks.run", "--smoke", "--out", str(out), timeout=480, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert not results["errors"]
    figures = results["figures"]
    assert {f["section"] for f in figures} == {"inference", "serving", "step", "network", "speculative", "recovery",
                                                  "scaleout", "hostile", "serve"}
    for f in figures:
        assert math.isfinite(f["swarm"]) and f["swarm"] >= 0, f
        if f["baseline"] is not None:
            assert f["baseline"] > 0 and f["ratio"] == pytest.approx(f["swarm"] / f["baseline"]), f
    names = {f["name"] for f in figures}
    assert {"inference steps/s, batch 1", "per-hop overhead per step", "forward tokens/s, batch 1x16",
            "loopback: inference steps/s, batch 1", "generation step in which a server died"} <= names
    for f in figures:
        if f["section"] == "network":  # measured can't beat the bound: it assumes no software overhead at all
            assert f["details"]["design"] in ("client-driven", "server-chained") and 0 < f["ratio"] <= 1.05, f
    speculative = [f for f in figures if f["section"] == "speculative"]  # it raises if its tokens are not plain's
    assert [f["details"]["agreement"] for f in speculative] == [0.5, 0.8, 0.95]
    assert all(1 <= f["details"]["tokens_per_round"] <= 9 for f in speculative), speculative
    check_step([f for f in figures if f["section"] == "step"])
    died = next(f for f in figures if f["name"] == "generation step in which a server died")
    assert "tokens identical to local: yes" in died["note"]
    check_hostile([f for f in figures if f["section"] == "hostile"])
    table = (out / "results.md").read_text()
    assert "| figure | swarm | baseline (same run) |" in table and "python -m benchmarks.run --smoke" in table
    assert "| class | attackers sent | generation step p50 / p99 ms (no attack) |" in table
    assert "| decode step part | ms (mean; per hop, but the return) | share, median |" in table
    for section in ("inference", "serving", "step", "network", "speculative", "recovery", "hostile", "serve"):
        assert (out / f"plot_{section}.png").stat().st_size > 1000


def check_step(figures: list[dict]) -> None:
    """The breakdown's parts add up to its step, and the three ratios have their in-process baselines."""
    parts = {f["details"]["part"]: f for f in figures if "part" in f["details"]}
    assert set(parts) == {*HOP_PARTS, RETURN, "step"}
    hops = 3
    total = sum(f["swarm"] * (1 if part == RETURN else hops) for part, f in parts.items() if part != "step")
    assert total == pytest.approx(parts["step"]["swarm"], rel=1e-6)  # means add up
    assert parts["compute"]["swarm"] > 0 and parts["step"]["details"]["echo_ms"] > 0
    names = {f["name"]: f for f in figures}
    for name in ("single-token step through 3 spans, batch 1", "inference steps/s, batch 1",
                 "forward tokens/s, batch 1x16, full model"):
        assert names[name]["baseline"] > 0, name
    assert "per-hop overhead per step" in names


def test_hop_parts_add_up_to_the_step():
    class Stream:
        def __init__(self, sent, received):
            self.sent_ns, self.received_ns = sent, received

    class Span:
        def __init__(self, sent, trace, received):
            self.stream, self.trace = Stream(sent, received), trace

    class Session:
        spans = [Span(10, [20, 21, 25, 40, 41], 50), Span(55, [60, 62, 63, 70, 72], 80)]

    hops = hop_parts(Session(), 0, 100)
    assert [hop["compute"] for hop in hops] == [15e-9, 7e-9]
    assert hops[0]["client Python"] == 10e-9 and hops[1]["client Python"] == 5e-9   # after the first reply
    assert hops[0]["p2pd out"] == 10e-9 and hops[0]["p2pd back"] == 9e-9 and hops[1][RETURN] == 20e-9
    assert sum(sum(hop.values()) for hop in hops) == pytest.approx(100e-9)


def check_hostile(figures: list[dict]) -> None:
    """Every class has its five figures, measured: the clients stepped, the attackers attacked, the server's
    memory and budget were read. Whether the server met its targets is the benchmark's to report, not ours."""
    by_class: dict[str, dict[str, dict]] = {}
    for f in figures:
        by_class.setdefault(f["details"]["class"], {})[f["details"]["measure"]] = f
    assert {"no attack", "flood", "headers"} <= set(by_class)
    for name, measures in by_class.items():
        assert set(measures) == {"gen_steps", "gen_opens", "train_steps", "rss", "budget"}, name
        assert not any(e.startswith("benchmark:") for e in measures["rss"]["details"]["errors"]), name
        assert all(measures[m]["details"]["samples"] > 0 for m in ("gen_steps", "gen_opens", "train_steps")), name
        assert 100 < measures["rss"]["swarm"] < 8192 and measures["rss"]["baseline"] > 300, name   # MiB
        assert measures["budget"]["baseline"] == pytest.approx(32.0), name   # the configured KV budget, free
        attackers = measures["budget"]["details"]["attackers"]
        assert (name == "no attack") == (not attackers), name
        assert all(a.get("sent", 0) + a.get("streams", 0) > 0 for a in attackers), (name, attackers)


def test_header_bombs_fit_the_header_limit():
    """Each bomb is as large as a header may be, and the wire refuses it or finds no tensors in it."""
    bombs = header_bombs()
    assert len(bombs) >= 4
    for bomb in bombs:
        assert len(bomb) - 4 <= wire.HEADER_LIMIT
        try:
            _, tensors = wire.unpack(bomb)
        except wire.WireError:
            continue
        assert tensors == {}


def test_p99_is_nearest_rank():
    assert p99(list(range(1, 101))) == 99
    assert p99([5.0]) == 5.0 and math.isnan(p99([]))


def test_bounds_count_one_way_trips_per_design():
    # 3 hops, 100 ms RTT, 100 Mbit/s, 1 kB each way per hop, 10 ms compute
    client = bound("client-driven", 3, 0.1, 1e8, 1000, 1000, 0.01)
    chained = bound("server-chained", 3, 0.1, 1e8, 1000, 1000, 0.01)
    assert client == pytest.approx(3 * 0.1 + 3 * 2000 * 8 / 1e8 + 0.01)
    assert chained == pytest.approx(4 * 0.05 + 4 * 1000 * 8 / 1e8 + 0.01)
    assert bound("client-driven", 3, 0.0, None, 1e9, 1e9, 0.01) == pytest.approx(0.01)  # loopback: compute only


def test_stream_window_estimate():
    assert window_round_trips(256 << 10) == 0            # fits the initial 256 KiB window
    assert window_round_trips((256 << 10) + 1) == 1
    assert window_round_trips(8 << 20) == 5               # 256 KiB, 512 KiB, ... 8 MiB: 6 flights


def test_link_serialises_then_delays():
    link = netem.Link(rate=1000.0, delay=0.05, limit=1.0)
    assert link.send(10.0, 100) == pytest.approx(10.0 + 0.1 + 0.05)
    assert link.send(10.0, 100) == pytest.approx(10.0 + 0.2 + 0.05)   # queued behind the first
    assert link.send(12.0, 100) == pytest.approx(12.0 + 0.1 + 0.05)   # idle again
    assert netem.Link(rate=1000.0, delay=0.0, limit=0.05, free_at=1.0).send(0.0, 10) is None  # queue full: drop


def test_network_uses_private_addresses_only():
    import ipaddress

    net = netem.Network(nodes=3, rate_mbit=100, rtt_ms=100)
    addresses = [ipaddress.ip_address(net.address(i)) for i in range(4)]
    assert all(a.is_private and a in ipaddress.ip_network(net.subnet) for a in addresses)
    assert len(set(addresses)) == 4 and net.namespace(0) is None
    assert all(net.namespace(i).startswith(netem.PREFIX) for i in range(1, 4))


def _can_emulate() -> bool:
    return (os.geteuid() == 0 and shutil.which("ip") is not None and os.path.exists("/dev/net/tun")
            and subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10).returncode == 0)


@pytest.mark.slow  # network namespaces for the benchmarks
@pytest.mark.skipif(not _can_emulate(), reason="needs root, iproute2 and /dev/net/tun")
def test_emulated_link_has_the_configured_rtt_and_is_removed():
    from benchmarks.common import Setting
    from benchmarks.network import emulated

    rtt_ms, port = 40.0, 47311
    with emulated(Setting("test", 100.0, rtt_ms), nodes=1) as net:
        node = net["nodes"][1]
        echo = (f"import socket; s = socket.create_server(({node['address']!r}, {port})); c, _ = s.accept(); "
                "[c.sendall(d) for d in iter(lambda: c.recv(64), b'')]")
        server = subprocess.Popen(["ip", "netns", "exec", node["namespace"], sys.executable, "-c", echo])
        try:
            conn = _connect(node["address"], port)
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                rtts = []
                for _ in range(5):
                    began = time.perf_counter()
                    conn.sendall(b"x")
                    assert conn.recv(1) == b"x"
                    rtts.append(time.perf_counter() - began)
        finally:
            server.kill()
            server.wait(10)
    assert rtt_ms / 1e3 <= sorted(rtts)[2] < 3 * rtt_ms / 1e3
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert netem.PREFIX + "-" not in namespaces


def _connect(address: str, port: int, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((address, port), timeout=2)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.slow
def test_forward_parts_smoke_run(tmp_path):
    """The per-part forward breakdown (issue 40) runs end to end on a small model and prints its table and ratio."""
    proc = run("benchmarks.forward_parts", "--layers", "2", "--hidden", "64", "--repeats", "1",
               "--out", str(tmp_path), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ratio = re.search(r"in-process / swarm = ([0-9.]+)", proc.stdout)
    assert ratio and float(ratio[1]) > 0, proc.stdout[-2000:]
    assert all(part in proc.stdout for part in ("embeddings", "LM head", "loss", "whole forward")), proc.stdout
