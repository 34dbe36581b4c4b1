"""Client-side settings: timeouts, retries, bans and routing, with defaults for a consumer Internet link."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ClientConfig:
    initial_peers: list[str] = field(default_factory=list)
    dht_prefix: str | None = None
    connect_timeout: float = 10.0     # opening a session stream, up to the server's first reply
    request_timeout: float = 60.0     # one forward or backward request, end to end
    step_timeout: float = 20.0        # one inference step, end to end
    retry_budget: float = 60.0        # how long to keep looking for servers for a block before giving up
    max_retries: int = 16             # failed attempts per span per call before giving up
    ban_base: float = 2.0             # first ban of a failing server, seconds; doubles per failure
    ban_max: float = 300.0
    refresh_period: float = 5.0       # how often the swarm view is re-read from the DHT
    routing_randomness: float = 1.0   # 0: always the fastest server; higher spreads training load wider
    verify_fraction: float = 0.0      # fraction of span requests re-checked on a second server
    wire_dtype: str | None = None     # cast activations for the wire (e.g. "bfloat16"); None keeps them
    # inference: servers pass each step's output to the next server directly. It saves a network trip
    # per hop but costs servers extra messages, so by default (None) it is used only over links slower
    # than `chain_min_rtt` (measured); True or False forces it.
    chaining: bool | None = None
    chain_min_rtt: float = 0.003
    push_wait: float = 1.0            # how long a server waits for the previous one's push before asking us
    startup_timeout: float = 30.0
    identity_path: str | None = None  # a stable peer id (needed to be on a private swarm's allowlist)
    swarm_key: str | None = None      # private swarm: file with the shared swarm key
    allowed_peers: list[str] | None = None  # private swarm: trust records of these servers only
