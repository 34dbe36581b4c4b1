"""LoRA applied on a server to frozen blocks, per request, with weights that belong to a client.

Every target linear layer of a served block is wrapped once in `LoraSlot`. A slot does nothing
unless a request activates a `LoraSet` around its computation (`activate`); then it adds
``scale * B(A(dropout(x)))`` with that request's tensors. Nothing is stored in the modules, so
concurrent clients never share adapter state.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from swarmtune.models.family import present_targets

_ACTIVE: contextvars.ContextVar[LoraSet | None] = contextvars.ContextVar("active_lora", default=None)


@dataclass
class LoraSet:
    """One adapter: `weights[key] = (A [r, in], B [out, r])`, keyed ``"{block}.{module path}"``."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float
    dropout: float = 0.0
    generator: torch.Generator | None = field(default=None, repr=False)

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.weights.values() for t in pair]


class LoraSlot(nn.Module):
    """A frozen linear layer (plain or quantized) that applies the active request's LoRA, if any."""

    def __init__(self, base: nn.Module, key: str):
        super().__init__()
        self.base, self.key = base, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        lora = _ACTIVE.get()
        pair = lora.weights.get(self.key) if lora is not None else None
        if pair is None:
            return y
        a, b = pair
        h = x.to(a.dtype)
        if lora.dropout > 0:
            keep = torch.rand(h.shape, generator=lora.generator, device="cpu").to(h.device) >= lora.dropout
            h = h * keep / (1 - lora.dropout)
        return y + (F.linear(F.linear(h, a), b) * lora.scale).to(y.dtype)


def wrap_targets(blocks: nn.ModuleList, start: int, targets: tuple[str, ...]) -> list[str]:
    """Wrap each target linear that each block has in a LoraSlot; returns the slot keys."""
    keys = []
    for offset, block in enumerate(blocks):
        for path in present_targets(block, targets):
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            key = f"{start + offset}.{path}"
            setattr(parent, name, LoraSlot(getattr(parent, name), key))
            keys.append(key)
    return keys


def lora_slots(module: nn.Module) -> dict[str, tuple[int, int]]:
    """Slot key -> (in_features, out_features) of each wrapped layer: what adapters are checked against."""
    return {m.key: (m.base.in_features, m.base.out_features) for m in module.modules() if isinstance(m, LoraSlot)}


@contextlib.contextmanager
def activate(lora: LoraSet | None):
    token = _ACTIVE.set(lora)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
