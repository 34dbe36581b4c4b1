"""The server's memory of client adapters stays bounded however many clients come."""

from __future__ import annotations

import torch

from swarmtune.server.lora import LoraSet
from swarmtune.server.lora_cache import LoraCache


def _lora(nbytes: int) -> LoraSet:
    return LoraSet({"0.q": (torch.zeros(nbytes // 8), torch.zeros(nbytes // 8))}, scale=1.0)


def test_per_peer_and_total_bounds():
    cache = LoraCache(per_peer=2, max_bytes=10_000)
    for i in range(3):
        cache.put("alice", f"v{i}", _lora(1000))
    assert cache.get("alice", "v0") is None and cache.get("alice", "v2") is not None
    for peer in range(50):
        cache.put(f"peer{peer}", "v", _lora(1000))
    assert cache.nbytes <= 10_000
    assert cache.get("peer49", "v") is not None and cache.get("peer0", "v") is None


def test_recently_used_survive():
    cache = LoraCache(per_peer=4, max_bytes=3000)
    cache.put("a", "x", _lora(1000))
    cache.put("b", "x", _lora(1000))
    cache.get("a", "x")  # a is now the most recent
    cache.put("c", "x", _lora(1000))
    cache.put("d", "x", _lora(1000))
    assert cache.get("a", "x") is not None and cache.get("b", "x") is None
