"""Client-side settings: timeouts, retries, bans and routing, with defaults for a consumer Internet link."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarmtune.errors import check_positive


@dataclass
class ClientConfig:
    initial_peers: list[str] = field(default_factory=list, metadata={"help": "multiaddrs of peers of the swarm"})
    dht_prefix: str | None = field(default=None, metadata={"help": "the model's swarm namespace; null: its name"})
    connect_timeout: float = field(default=10.0, metadata={
        "help": "opening a session stream, up to the server's first reply"})
    request_timeout: float = field(default=60.0, metadata={"help": "one forward or backward request, end to end"})
    step_timeout: float = field(default=20.0, metadata={"help": "one inference step, end to end"})
    retry_budget: float = field(default=60.0, metadata={
        "help": "how long to keep looking for servers for a block before giving up"})
    max_retries: int = field(default=16, metadata={"help": "failed attempts per span per call before giving up"})
    ban_base: float = field(default=2.0, metadata={"help": "first ban of a failing server, seconds; doubles per "
                                                           "failure"})
    ban_max: float = 300.0
    refresh_period: float = field(default=5.0, metadata={"help": "how often the swarm view is re-read from the DHT"})
    routing_randomness: float = field(default=1.0, metadata={
        "help": "0: always the fastest server; higher spreads training load wider"})
    verify_fraction: float = field(default=0.0, metadata={
        "help": "fraction of span requests re-checked on a second server"})
    wire_dtype: str | None = field(default=None, metadata={
        "help": "cast activations for the wire (e.g. bfloat16); null keeps them"})
    # Servers can pass each inference step's output to the next server directly. It saves a network trip
    # per hop but costs servers extra messages, so by default (None) only over links slower than
    # `chain_min_rtt` (measured).
    chaining: bool | None = field(default=None, metadata={"help": "true or false forces server-to-server "
                                                                  "chaining; null: by measured round trips"})
    chain_min_rtt: float = 0.003
    push_wait: float = field(default=1.0, metadata={
        "help": "how long a server waits for the previous one's push before asking us"})
    startup_timeout: float = 30.0
    identity_path: str | None = field(default=None, metadata={
        "help": "a stable peer id (needed to be on a private swarm's allowlist)"})
    swarm_key: str | None = field(default=None, metadata={"help": "private swarm: file with the shared swarm key"})
    allowed_peers: list[str] | None = field(default=None, metadata={
        "help": "private swarm: trust records of these servers only"})

    def __post_init__(self):
        for name in ("connect_timeout", "request_timeout", "step_timeout", "retry_budget", "max_retries",
                     "ban_base", "ban_max", "refresh_period", "startup_timeout"):
            check_positive(self, name)
        if not 0 <= self.verify_fraction <= 1:
            raise ValueError(f"verify_fraction must lie in [0, 1], got {self.verify_fraction}")
        if self.routing_randomness < 0 or self.push_wait < 0 or self.chain_min_rtt < 0:
            raise ValueError("routing_randomness, push_wait and chain_min_rtt must be >= 0")
        if self.wire_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"wire_dtype must be float32, bfloat16, float16 or null, got {self.wire_dtype!r}")
