"""The benchmark suite runs end to end (smoke sizes) and its pieces compute what they claim.

The smoke run starts real loopback swarms, kills servers and writes every output, so the
benchmark code cannot rot; the emulated-network test runs only where namespaces and TUN work.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from benchmarks.network import bound, window_round_trips
from scripts import netem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_writes_sane_results(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert not results["errors"]
    figures = results["figures"]
    assert {f["section"] for f in figures} == {"inference", "serving", "network", "recovery"}
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
    died = next(f for f in figures if f["name"] == "generation step in which a server died")
    assert "tokens identical to local: yes" in died["note"]
    table = (out / "results.md").read_text()
    assert "| figure | swarm | baseline (same run) |" in table and "python -m benchmarks.run --smoke" in table
    for section in ("inference", "serving", "network", "recovery"):
        assert (out / f"plot_{section}.png").stat().st_size > 1000


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
