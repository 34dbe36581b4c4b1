"""What a server's RPC rooms are set to: request limits, session and graph lifetimes, memory for graphs and
working activations (the server's command line fills it; every room reads its part)."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarmtune.server.faults import Faults
from swarmtune.server.requests import Limits


@dataclass
class HandlerConfig:
    limits: Limits = field(default_factory=Limits)
    session_timeout: float = 60.0     # idle inference sessions are closed after this long
    alloc_timeout: float = 10.0       # how long a session waits for KV memory
    lora_cache_per_peer: int = 4      # adapter versions remembered per client (digest reuse)
    faults: Faults = field(default_factory=Faults)  # test-only misbehaviour
    graph_bytes: int = 512 << 20      # forward graphs kept for their backward (0: always recompute)
    graph_ttl: float = 120.0          # seconds a kept graph waits for its backward
    evict_idle_after: float = 1.0     # a session idle this long may be evicted for a peer that waits for memory
    cuda_graphs: bool = True          # plain single-token steps replay a CUDA graph (CUDA devices only)
    working_bytes: int | None = None  # activations of the requests computing at once (None: working_memory.auto_bytes)
