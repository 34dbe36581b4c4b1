"""What servers announce on the DHT, and how such records are read back safely.

Per block, the DHT key ``"{prefix}.{block}"`` holds one subkey per server (its peer id) with a
`ServerInfo`; the key ``"{prefix}"`` holds a `ModelInfo`, and the key `MODELS_KEY` the same
`ModelInfo` with its prefix, so that a reader can list every model a swarm serves. The key
``"{prefix}.unreachable"`` holds, per server, the peers it found announced but not answering
(`unreachable_key`), so that the others plan without them at once. Records expire
unless refreshed. Readers validate every record: anything malformed, of another protocol version or offline is
skipped, never fatal.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

PROTOCOL_VERSION = 2
MODELS_KEY = "_swarmtune.models"
MAX_BLOCKS = 1024  # far above any model served (Llama 3.1 405B has 126): a record claiming more is a lie
STATES = ("joining", "online", "offline")


@dataclass(frozen=True)
class ServerInfo:
    peer_id: str
    start: int                       # the blocks served now (while "joining": the span being loaded)
    end: int
    state: str = "online"
    target: tuple[int, int] | None = None  # the whole span it holds, where it serves only part of it yet (loading)
    pinned: bool = False             # its span was given (--blocks): it never moves, others plan around it
    throughput: float = 1.0          # forward tokens/s per block: what training routes by
    capacity: float = 0.0            # memory for blocks, in the model's largest blocks (0: not said; its span's)
    inference_rps: float = 1.0       # single-token steps/s for the whole span
    dtype: str = "float32"
    quant: str = "none"
    cache_tokens_left: int = 0
    tokens_in_flight: int = 0        # tokens of one peer's requests it admits at once (0: not said)
    adapters: tuple[str, ...] = ()
    version: str = ""
    addrs: tuple[str, ...] = ()      # multiaddrs clients may dial directly
    protocol: int = PROTOCOL_VERSION
    extra: dict = field(default_factory=dict)
    expires: float = 0.0             # when this record expires (DHT time): set by readers, not announced

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end

    @property
    def whole_span(self) -> tuple[int, int]:
        """The span this server holds once loaded: what block selection plans with."""
        return self.target or self.span

    def to_record(self) -> dict:
        record = dataclasses.asdict(self) | {"adapters": list(self.adapters), "addrs": list(self.addrs),
                                             "target": list(self.target) if self.target else None}
        del record["expires"]
        return record

    @classmethod
    def from_record(cls, peer_id: str, record) -> ServerInfo | None:
        """A validated ServerInfo, or None if the record is malformed or foreign."""
        if not isinstance(record, dict) or record.get("protocol") != PROTOCOL_VERSION:
            return None
        try:
            info = cls(
                peer_id=str(peer_id),
                start=_int(record["start"]), end=_int(record["end"]),
                state=record["state"],
                target=_span(record.get("target")),
                pinned=record.get("pinned", False) is True,
                throughput=_positive(record["throughput"]), inference_rps=_positive(record["inference_rps"]),
                capacity=_capacity(record.get("capacity", 0.0)),
                dtype=str(record["dtype"]), quant=str(record["quant"]),
                cache_tokens_left=_int(record["cache_tokens_left"]),
                tokens_in_flight=_int(record.get("tokens_in_flight", 0)),
                adapters=tuple(str(a) for a in record.get("adapters", ())),
                version=str(record.get("version", "")),
                addrs=tuple(str(a) for a in record.get("addrs", ())),
                extra=dict(record.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError):
            return None
        if info.state not in STATES or not 0 <= info.start < info.end or record.get("peer_id") != peer_id:
            return None
        if info.target is not None and not info.target[0] <= info.start < info.end <= info.target[1]:
            return None
        return info


@dataclass(frozen=True)
class ModelInfo:
    num_blocks: int
    model_id: str
    model_type: str = ""

    def to_record(self, prefix: str | None = None) -> dict:
        """The record under the model's own key, or with `prefix`, the one under MODELS_KEY."""
        record = dataclasses.asdict(self) | {"protocol": PROTOCOL_VERSION}
        return record if prefix is None else record | {"prefix": prefix}

    @classmethod
    def from_record(cls, record) -> ModelInfo | None:
        if not isinstance(record, dict) or record.get("protocol") != PROTOCOL_VERSION:
            return None
        try:
            info = cls(_int(record["num_blocks"]), str(record["model_id"])[:256],
                       str(record.get("model_type", ""))[:64])
        except (KeyError, TypeError, ValueError):
            return None
        return info if 0 < info.num_blocks <= MAX_BLOCKS else None


def _int(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"expected int, got {type(x)}")
    return x


def _span(x) -> tuple[int, int] | None:
    if x is None:
        return None
    start, end = x
    if not 0 <= _int(start) < _int(end) <= MAX_BLOCKS:
        raise ValueError("expected a span of blocks")
    return start, end


def _capacity(x) -> float:
    """0 (not said: records of servers before it was announced), or a positive number of blocks the model may have."""
    return 0.0 if x == 0 else min(_positive(x), float(MAX_BLOCKS))


def _positive(x) -> float:
    x = float(x)
    if not math.isfinite(x) or x <= 0:
        raise ValueError("expected a positive finite number")
    return x


def dht_prefix(model: str) -> str:
    """The DHT namespace of a model: its repository or directory name, made key-safe."""
    name = os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model.split("/")[-1]
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def block_key(prefix: str, block: int) -> str:
    return f"{prefix}.{block}"


def unreachable_key(prefix: str) -> str:
    return f"{prefix}.unreachable"


MAX_REPORTED = 64  # peers one report may name (a small swarm's planners ping at most 16 of them)


def reported_peers(record) -> frozenset[str]:
    """The peer ids of a record under `unreachable_key` (empty where it is malformed): claims to check, not facts."""
    if not isinstance(record, (list, tuple)) or len(record) > MAX_REPORTED:
        return frozenset()
    return frozenset(p for p in record if isinstance(p, str) and len(p) <= 128)
