"""Server-side inference sessions: a KV cache per session, drawn from a bounded memory budget."""

from __future__ import annotations

import asyncio
import contextlib
import time

import torch

from swarmtune.models.span import SpanModel
from swarmtune.server import lora as lora_lib
from swarmtune.server.lora import LoraSet
from swarmtune.server.requests import RequestError, ServerBusy


class CacheBudget:
    """Bytes of KV cache the server may hold; sessions wait (bounded) for room.

    Used from the event loop only, so plain counters suffice; `release` is synchronous so that
    a session's cleanup cannot be interrupted halfway.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self._freed = asyncio.Event()

    @property
    def free(self) -> int:
        return self.max_bytes - self.used

    async def acquire(self, nbytes: int, timeout: float) -> None:
        if nbytes > self.max_bytes:
            raise RequestError(f"the session needs {nbytes} bytes of KV cache but this server's whole cache "
                               f"budget is {self.max_bytes} bytes: ask for a shorter max_length or smaller batch")
        deadline = time.monotonic() + timeout
        while self.used + nbytes > self.max_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerBusy(f"no room for {nbytes} bytes of KV cache after waiting {timeout:.0f} s "
                                 f"({self.free} of {self.max_bytes} bytes free)")
            self._freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._freed.wait(), left)
        self.used += nbytes

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
        self._freed.set()


class ServerSession:
    """A client's inference session as this server holds it: KV cache and the padding mask of all tokens so far."""

    def __init__(self, span: SpanModel, batch_size: int, max_length: int, lora: LoraSet | None,
                 deep_prompts: torch.Tensor | None, session_id: str | None = None):
        self.span, self.id = span, session_id
        self.max_length = max_length
        self.cache = span.make_cache(batch_size, max_length)
        self.device = self.cache.keys.device
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)
        self.lora = lora
        self.deep_prompts = deep_prompts.to(self.device, span.compute_dtype) if deep_prompts is not None else None

    @property
    def length(self) -> int:
        return self.cache.length

    def step(self, hidden: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor | None,
             reorder: torch.Tensor | None) -> torch.Tensor:
        """Run new tokens through the span, extending the cache (compute thread)."""
        batch, new = hidden.shape[:2]
        if batch != self.cache.batch_size:
            raise RequestError(f"step has batch {batch} but the session was opened with {self.cache.batch_size}")
        if self.length + new > self.max_length:
            raise RequestError(f"session length {self.length + new} would exceed its max_length {self.max_length}")
        if reorder is not None:
            if not bool(((reorder >= 0) & (reorder < batch)).all()):
                raise RequestError("'reorder' indices must lie in [0, batch)")
            self.cache.reorder(reorder)
            self.mask = self.mask[reorder.to(self.device)]
        chunk = mask.to(self.device) if mask is not None else torch.ones(batch, new, dtype=torch.long,
                                                                         device=self.device)
        full_mask = torch.cat([self.mask, chunk], dim=1)
        pos = position_ids.to(self.device) if position_ids is not None else None
        with torch.inference_mode(), lora_lib.activate(self.lora):
            out = self.span(hidden.to(self.device, self.span.compute_dtype), full_mask, pos, cache=self.cache,
                            deep_prompts=self.deep_prompts)
        self.mask = full_mask
        return out.to("cpu", hidden.dtype)
