"""An emulated network for benchmarks: swarm nodes in network namespaces, joined by links with a rate and a delay.

    python scripts/netem.py up --nodes 3 --rate-mbit 100 --rtt-ms 100   # until SIGINT/SIGTERM or stdin closes
    python scripts/netem.py down                                         # idempotent cleanup of a crashed run

Node 0 is the root namespace (the client and the bootstrap peer); nodes 1..N each get a namespace
of their own. Every node has one TUN device with an address in a private /24 that this script
assigns; `up` prints one line ``READY {json}`` naming each node's namespace and address.

Why user space and not `tc netem`: this machine's kernel is built without the netem qdisc
(CONFIG_NET_SCH_NETEM unset; only tbf and htb exist, and they cannot delay). So this process does
netem's job for every link, with its semantics: each node has an access link to a hub, and a
packet is serialised at `rate` on the sender's uplink, flies RTT/4, is serialised again on the
receiver's downlink and flies another RTT/4, so every pair of nodes sees the configured RTT and
bandwidth; a link whose backlog exceeds netem's default limit (1000 packets) drops. The MTU is
9000 (jumbo frames) to keep the per-packet cost of a Python forwarder affordable on two cores.

Traffic cannot leave the machine: the namespaces have no other interface and no default route,
the root namespace only gains a route to the private /24, and the forwarder drops every packet
that is not IPv4 addressed to one of its nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import heapq
import ipaddress
import itertools
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

PREFIX = "swtb"              # every device and namespace this script creates starts with it
SUBNET = "10.213.0.0/24"
QUEUE_PACKETS = 1000         # netem's default queue limit
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


@dataclass
class Link:
    """One direction of a node's access link: packets leave one after another at `rate`, then fly for `delay`."""

    rate: float          # bytes per second
    delay: float         # seconds
    limit: float         # seconds of backlog beyond which packets are dropped
    free_at: float = 0.0

    def send(self, now: float, size: int) -> float | None:
        """When a packet of `size` bytes handed over at `now` arrives at the other end; None if dropped."""
        start = max(now, self.free_at)
        if start - now > self.limit:
            return None
        self.free_at = start + size / self.rate
        return self.free_at + self.delay


@dataclass(frozen=True)
class Network:
    nodes: int                  # namespaces besides the root namespace
    rate_mbit: float
    rtt_ms: float
    mtu: int = 9000
    prefix: str = PREFIX
    subnet: str = SUBNET

    def address(self, node: int) -> str:
        return str(ipaddress.ip_network(self.subnet)[node + 1])

    def namespace(self, node: int) -> str | None:
        return None if node == 0 else f"{self.prefix}-{node}"

    def device(self, node: int) -> str:
        return f"{self.prefix}{node}"

    def links(self) -> tuple[list[Link], list[Link]]:
        """Uplinks and downlinks of every node (0..nodes)."""
        rate, delay = self.rate_mbit * 1e6 / 8, self.rtt_ms / 1000 / 4
        limit = QUEUE_PACKETS * self.mtu / rate

        def make() -> list[Link]:
            return [Link(rate, delay, limit) for _ in range(self.nodes + 1)]

        return make(), make()

    def describe(self) -> dict:
        return {"rate_mbit": self.rate_mbit, "rtt_ms": self.rtt_ms, "mtu": self.mtu, "subnet": self.subnet,
                "nodes": [{"node": i, "namespace": self.namespace(i), "address": self.address(i)}
                          for i in range(self.nodes + 1)]}


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def open_tun(name: str) -> int:
    """A TUN device named `name` (packets without extra headers); it vanishes when the descriptor closes."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def check_subnet_free(subnet: str) -> None:
    """Refuse to shadow any network this machine already uses."""
    ours = ipaddress.ip_network(subnet)
    for line in ip("-4", "-o", "route", "show").stdout.splitlines():
        dest = line.split()[0]
        if dest != "default" and ipaddress.ip_network(dest, strict=False).overlaps(ours):
            raise SystemExit(f"{subnet} overlaps the existing route {line!r}; run `down` or pick another --subnet")


def up(net: Network) -> list[int]:
    """Create the namespaces and TUN devices; returns the TUN descriptors, node by node."""
    check_subnet_free(net.subnet)
    length = ipaddress.ip_network(net.subnet).prefixlen
    fds = []
    for node in range(net.nodes + 1):
        dev, ns = net.device(node), net.namespace(node)
        fds.append(open_tun(dev))
        at: tuple[str, ...] = ()
        if ns is not None:
            ip("netns", "add", ns)
            ip("link", "set", dev, "netns", ns)
            at = ("-n", ns)
            ip(*at, "link", "set", "lo", "up")
        ip(*at, "addr", "add", f"{net.address(node)}/{length}", "dev", dev)
        ip(*at, "link", "set", dev, "mtu", str(net.mtu), "up")
    return fds


def down(prefix: str = PREFIX) -> None:
    """Remove every namespace (and the processes left in it) and device named with `prefix`; safe to repeat."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        if not ns.startswith(prefix + "-"):
            continue
        for pid in ip("netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        ip("netns", "del", ns, check=False)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            ip("link", "del", name, check=False)


def forward(net: Network, fds: list[int], stop_fd: int) -> None:
    """Move packets between the nodes' TUN devices with each link's rate and delay, until `stop_fd` is readable."""
    uplinks, downlinks = net.links()
    node_of = {ipaddress.ip_address(net.address(i)).packed: i for i in range(net.nodes + 1)}
    src_of_fd = {fd: i for i, fd in enumerate(fds)}
    pending: list[tuple[float, int, int, bytes]] = []  # (due, tie-break, node, packet)
    order = itertools.count()
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else 1.0
        ready, _, _ = select.select([*fds, stop_fd], [], [], timeout)
        if stop_fd in ready:
            return
        for fd in ready:
            for _ in range(256):  # bounded: one busy device cannot starve the others
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                dst = node_of.get(packet[16:20]) if packet[:1] and packet[0] >> 4 == 4 else None
                if dst is None:
                    continue  # not IPv4 to one of our nodes: dropped, never forwarded anywhere else
                hub = uplinks[src_of_fd[fd]].send(time.monotonic(), len(packet))
                due = None if hub is None else downlinks[dst].send(hub, len(packet))
                if due is not None:
                    heapq.heappush(pending, (due, next(order), dst, packet))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, dst, packet = heapq.heappop(pending)
            with contextlib.suppress(OSError):
                os.write(fds[dst], packet)


def run(net: Network) -> None:
    """`up`, report READY, forward until told to stop, then tear everything down."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fds: list[int] = []
    try:
        down(net.prefix)
        fds = up(net)
        with contextlib.suppress(PermissionError):
            os.nice(-10)  # the wire must not queue behind the compute it connects
        print("READY " + json.dumps(net.describe()), flush=True)
        forward(net, fds, sys.stdin.fileno())
    except KeyboardInterrupt:
        pass
    finally:
        for fd in fds:
            os.close(fd)
        down(net.prefix)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="create the network and forward packets until stopped")
    u.add_argument("--nodes", type=int, required=True, help="namespaces besides the root namespace")
    u.add_argument("--rate-mbit", type=float, required=True)
    u.add_argument("--rtt-ms", type=float, required=True)
    u.add_argument("--mtu", type=int, default=9000)
    u.add_argument("--subnet", default=SUBNET)
    u.add_argument("--prefix", default=PREFIX)
    d = sub.add_parser("down", help="remove whatever an earlier run left behind")
    d.add_argument("--prefix", default=PREFIX)
    args = p.parse_args(argv)
    if args.command == "down":
        down(args.prefix)
    else:
        run(Network(args.nodes, args.rate_mbit, args.rtt_ms, args.mtu, args.prefix, args.subnet))


if __name__ == "__main__":
    main()
