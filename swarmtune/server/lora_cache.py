"""Client adapters a server remembers by digest, so a backward (or the next step) need not resend them.

Bounded in entries per client and in bytes overall: a public server meets many clients, and each
one's adapter may be large; the least recently used go first.
"""

from __future__ import annotations

from collections import OrderedDict

from swarmtune.server.lora import LoraSet


class LoraCache:
    def __init__(self, per_peer: int = 4, max_bytes: int = 1 << 30):
        self.per_peer, self.max_bytes = per_peer, max_bytes
        self.items: OrderedDict[tuple[str, str], LoraSet] = OrderedDict()
        self.nbytes = 0

    def get(self, peer: str, digest: str) -> LoraSet | None:
        lora = self.items.get((peer, digest))
        if lora is not None:
            self.items.move_to_end((peer, digest))
        return lora

    def put(self, peer: str, digest: str, lora: LoraSet) -> None:
        self._drop((peer, digest))
        self.items[(peer, digest)] = lora
        self.nbytes += _nbytes(lora)
        mine = [key for key in self.items if key[0] == peer]
        for key in mine[:max(0, len(mine) - self.per_peer)]:
            self._drop(key)
        while self.nbytes > self.max_bytes and len(self.items) > 1:
            self._drop(next(iter(self.items)))

    def _drop(self, key: tuple[str, str]) -> None:
        lora = self.items.pop(key, None)
        if lora is not None:
            self.nbytes -= _nbytes(lora)


def _nbytes(lora: LoraSet) -> int:
    return sum(t.numel() * t.element_size() for t in lora.tensors())
