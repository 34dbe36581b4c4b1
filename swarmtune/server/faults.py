"""Deliberate misbehaviour for testing clients against bad servers (never enable in production).

`--fault delay=2,nan` makes a server sleep 2 s before each reply and return NaNs; other kinds:
`shape` (drop the last position), `perturb=0.05` (add that much noise: a wrong but plausible result),
`load=1` (take 1 s more to load each block: a slow disk, to watch a server serve as it loads).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Faults:
    delay: float = 0.0
    nan: bool = False
    shape: bool = False
    perturb: float = 0.0
    load: float = 0.0

    @classmethod
    def parse(cls, spec: str | None) -> Faults:
        if not spec:
            return cls()
        fields = {}
        for part in spec.split(","):
            name, _, value = part.partition("=")
            if name in ("delay", "perturb", "load"):
                fields[name] = float(value)
            elif name in ("nan", "shape"):
                fields[name] = True
            else:
                raise ValueError(f"unknown fault {name!r} (known: delay=S, nan, shape, perturb=X, load=S)")
        return cls(**fields)

    async def wait(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)

    def corrupt(self, t: torch.Tensor) -> torch.Tensor:
        if self.nan:
            t = torch.full_like(t, float("nan"))
        if self.perturb:
            t = t + self.perturb * torch.randn_like(t)
        if self.shape:
            t = t[:, :-1]
        return t
