"""What a server serves now: its span of blocks (which grows as it loads and changes as it moves), the parts of
it that requests ask for, and the adapters requests run with (hosted ones by name, or the client's own)."""

from __future__ import annotations

import torch

from swarmtune.adapters.lora import ClientLora
from swarmtune.models.span import SpanModel
from swarmtune.server.hosted_adapters import hosted_for
from swarmtune.server.lora import LoraSet, lora_slots
from swarmtune.server.lora_cache import LoraCache
from swarmtune.server.requests import Limits, build_lora, need

MAX_POSITION = 1 << 24


class Served:
    def __init__(self, span: SpanModel, adapters: dict[str, ClientLora], limits: Limits, lora_cache_per_peer: int):
        self.adapters = adapters  # hosted adapters' LoRA as read; `hosted_adapters`: for the span served
        self.limits = limits
        self.hidden_size = span.config.hidden_size
        self.num_blocks = span.config.num_hidden_layers
        self.device = next(span.parameters()).device
        self.lora_cache = LoraCache(lora_cache_per_peer)
        self.hosted_adapters: dict[str, LoraSet] = {}
        self.serve(span)

    def serve(self, span: SpanModel) -> None:
        self.span, self.slots, self.subspans = span, lora_slots(span), {}
        self.hosted_adapters = hosted_for(self.adapters, span, self.slots, self.hosted_adapters)

    @property
    def blocks(self) -> tuple[int, int]:
        return self.span.start, self.span.end

    def serves(self, start: int, end: int) -> bool:
        return self.span.start <= start and end <= self.span.end

    def subspan(self, start: int, end: int) -> SpanModel:
        if (start, end) not in self.subspans:
            self.subspans[(start, end)] = self.span.part(start, end)
        return self.subspans[(start, end)]

    def resolve_lora(self, peer: str, lora_meta: dict | None, tensors: list[torch.Tensor] | None,
                     start: int, end: int) -> LoraSet | None:
        """The request's adapter: hosted by name, sent now, or remembered from an earlier request by digest."""
        if lora_meta is None:
            return None
        if "adapter" in lora_meta:
            name = lora_meta["adapter"]
            need(name in self.hosted_adapters, f"adapter {name!r} is not hosted here "
                                               f"(hosted: {sorted(self.hosted_adapters)})")
            return self.hosted_adapters[name]
        digest = lora_meta.get("digest")
        if tensors is None:
            lora = self.lora_cache.get(peer, digest)
            need(lora is not None, f"unknown LoRA digest {digest!r}: send the adapter tensors")
        else:
            lora = build_lora(lora_meta, tensors, self.slots, (start, end), self.limits, self.span.compute_dtype,
                              self.device)
            if digest is not None:
                self.lora_cache.put(peer, digest, lora)
        if lora.scale != lora_meta["scale"] or lora.dropout != lora_meta.get("dropout", 0.0):
            lora = LoraSet(lora.weights, float(lora_meta["scale"]), float(lora_meta.get("dropout", 0.0)))
        return lora
