"""Forward passes kept for their backward: training without recomputing the forward on the server.

A client that will back-propagate asks the server to keep the forward's autograd graph under a
request id; the backward then only walks it back. Graphs cost memory (activations of every block),
so they are bounded in bytes (what autograd really saved for each, see `compute.forward_with_graph`)
and age (the servicer expires them on a timer too): when one was evicted, expired, or the backward
goes to another server, the backward simply recomputes the forward, as a stateless server would.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from swarmtune.server.compute import Graph


class KeptGraphs:
    def __init__(self, max_bytes: int, ttl: float = 120.0):
        self.max_bytes, self.ttl = max_bytes, ttl
        self.items: OrderedDict[tuple, Graph] = OrderedDict()
        self.nbytes = 0

    def wanted(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.max_bytes

    def put(self, key: tuple, graph: Graph) -> None:
        self.expire()
        self.drop(key)
        if graph.nbytes > self.max_bytes:  # larger than the estimate let through: not kept
            return
        while self.items and self.nbytes + graph.nbytes > self.max_bytes:
            self.drop(next(iter(self.items)))  # the oldest first
        self.items[key] = graph
        self.nbytes += graph.nbytes

    def take(self, key: tuple) -> Graph | None:
        self.expire()
        graph = self.items.pop(key, None)
        if graph is not None:
            self.nbytes -= graph.nbytes
        return graph

    def drop(self, key: tuple) -> None:
        graph = self.items.pop(key, None)
        if graph is not None:
            self.nbytes -= graph.nbytes

    def expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, g in self.items.items() if now - g.created > self.ttl]:
            self.drop(key)
