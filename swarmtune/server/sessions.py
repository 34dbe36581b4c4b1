"""Server-side inference sessions: a KV cache per session, drawn from a bounded memory budget."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from swarmtune.models.span import SpanModel
from swarmtune.server import cuda
from swarmtune.server import lora as lora_lib
from swarmtune.server.lora import LoraSet
from swarmtune.server.requests import RequestError, ServerBusy

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Lease:
    """One session's share of the KV budget. `idle_since` is None while the session runs a step."""

    peer: str
    nbytes: int
    idle_since: float | None
    evicted: bool = False
    on_evict: Callable[[], None] | None = None  # frees what the bytes stand for (the session's cache)
    created: float = field(default_factory=time.monotonic)


class CacheBudget:
    """Bytes of KV cache the server may hold, shared fairly between the peers that hold or want some.

    A session that does not fit waits (bounded). A peer whose request keeps it within its fair share
    (the budget over the number of peers holding or waiting) makes room by evicting sessions of other
    peers above their share, only when that makes enough room: first those idle for `evict_idle_after`
    seconds, most idle first, then (a peer that keeps all its sessions stepping) the oldest sessions of
    such peers, active or not, until each is down to its share. A session evicted in the middle of a
    step ends after it. A peer above its share does not take freed memory ahead of a
    poorer waiting peer whose request fits within that peer's share, nor the memory that a poorer peer
    held in the last RECENT seconds (up to that peer's share): a client between two sessions finds its
    room again, rather than taken by a hog that re-takes whatever is freed. Used from the event loop
    only, so plain counters suffice; `release` and eviction are synchronous, so cleanup cannot be
    interrupted halfway.
    """

    RECENT = 10.0  # seconds that the memory a peer held stays set aside for it against richer peers

    def __init__(self, max_bytes: int, evict_idle_after: float = 1.0):
        self.max_bytes = max_bytes
        self.evict_idle_after = evict_idle_after
        self.used = 0
        self.leases: set[Lease] = set()
        self.waiting: dict[str, list[int]] = defaultdict(list)  # peer -> the sizes it waits for
        self.recent: dict[str, tuple[float, int]] = {}  # peer -> (when it last held memory, the most it held)
        self.evictions = 0
        self._changed = asyncio.Event()

    @property
    def free(self) -> int:
        return self.max_bytes - self.used

    def held_by(self) -> dict[str, int]:
        held: dict[str, int] = defaultdict(int)
        for lease in self.leases:
            held[lease.peer] += lease.nbytes
        return held

    def fair_share(self, held: dict[str, int], also: dict[str, int] | None = None) -> float:
        """The budget over the peers holding or waiting (and those in `also`)."""
        return self.max_bytes / max(1, len(held.keys() | self.waiting.keys() | (also or {}).keys()))

    def check_fits(self, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            raise RequestError(f"the session needs {nbytes} bytes of KV cache but this server's whole cache "
                               f"budget is {self.max_bytes} bytes: ask for a shorter max_length or smaller batch")

    async def acquire(self, peer: str, nbytes: int, timeout: float) -> Lease:
        self.check_fits(nbytes)
        deadline = time.monotonic() + timeout
        self.waiting[peer].append(nbytes)
        try:
            while not self._may_take(peer, nbytes):
                self._evict_for(peer, nbytes)
                if self._may_take(peer, nbytes):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerBusy(f"no room for {nbytes} bytes of KV cache after waiting {timeout:.0f} s "
                                     f"({self.free} of {self.max_bytes} bytes free)")
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):  # sessions become evictable as time passes
                    await asyncio.wait_for(self._changed.wait(), min(left, max(0.1, self.evict_idle_after / 4)))
        finally:
            self.waiting[peer].remove(nbytes)
            if not self.waiting[peer]:
                del self.waiting[peer]
            self._changed.set()  # one waiter fewer: the others' shares and turns change
        lease = Lease(peer, nbytes, time.monotonic())
        self.leases.add(lease)
        self.used += nbytes
        self._note_held(peer)
        return lease

    def release(self, lease: Lease) -> None:
        if lease in self.leases:
            self._note_held(lease.peer)
            self.leases.remove(lease)
            self.used -= lease.nbytes
            self._changed.set()

    def _note_held(self, peer: str) -> None:
        now = time.monotonic()
        held = sum(lease.nbytes for lease in self.leases if lease.peer == peer)
        when, most = self.recent.get(peer, (0.0, 0))
        self.recent[peer] = (now, max(held, most) if now - when <= self.RECENT else held)

    def _recent_use(self) -> dict[str, int]:
        """The most each peer held in the last RECENT seconds (older entries are forgotten)."""
        now = time.monotonic()
        self.recent = {p: (when, most) for p, (when, most) in self.recent.items() if now - when <= self.RECENT}
        return {p: most for p, (_, most) in self.recent.items()}

    def _may_take(self, peer: str, nbytes: int) -> bool:
        if self.used + nbytes > self.max_bytes:
            return False
        held, recent = self.held_by(), self._recent_use()
        share = self.fair_share(held, recent)
        mine = held.get(peer, 0)
        if mine + nbytes <= share:
            return True
        if any(p != peer and held.get(p, 0) < mine and held.get(p, 0) + min(sizes) <= share
               for p, sizes in self.waiting.items()):
            return False
        set_aside = sum(max(0, min(most, share) - held.get(p, 0)) for p, most in recent.items()
                        if p != peer and held.get(p, 0) < mine)
        return self.used + nbytes + set_aside <= self.max_bytes

    def _evict_for(self, peer: str, nbytes: int) -> None:
        """Evict idle sessions of peers over their fair share so that `nbytes` fit, if that can make them fit
        and the request keeps `peer` within its own share."""
        held, now = self.held_by(), time.monotonic()
        share = self.fair_share(held)
        if held.get(peer, 0) + nbytes > share:
            return
        others = [lease for lease in self.leases if lease.peer != peer]
        idle = sorted((lease for lease in others if lease.idle_since is not None
                       and now - lease.idle_since >= self.evict_idle_after), key=lambda lease: lease.idle_since)
        oldest = sorted((lease for lease in others if lease not in idle), key=lambda lease: lease.created)
        chosen, free = [], self.free
        for lease in idle + oldest:
            if free >= nbytes:
                break
            if held[lease.peer] > share:
                chosen.append(lease)
                held[lease.peer] -= lease.nbytes
                free += lease.nbytes
        if free < nbytes:
            return
        for lease in chosen:
            self.evictions += 1
            self.evict(lease)

    def evict(self, lease: Lease) -> None:
        """End `lease`'s session (it takes no more steps) and give its memory to others: now if it is idle, else
        once its step ends (its owner frees it then)."""
        lease.evicted = True
        self.release(lease)
        if lease.on_evict is not None and lease.idle_since is not None:
            lease.on_evict()


@dataclass
class CacheEdits:
    """What a step changes in a session's cache before its new tokens run.

    `reorder` (beam search) picks the row each row continues. `truncate` drops every entry from
    that length on, and `keep` [batch] hides each row's entries from its own length on (speculative
    decoding: the rejected drafts, which may differ per row). `reset` lists rows whose earlier
    tokens are hidden from now on, so that a client batching many requests in one session can hand
    a finished request's row to a new one without reopening the session.
    """

    reorder: torch.Tensor | None = None
    truncate: int | None = None
    keep: torch.Tensor | None = None
    reset: torch.Tensor | None = None


def static_steps_apply(span: SpanModel, lora: LoraSet | None, deep_prompts: torch.Tensor | None) -> bool:
    """Whether a session may replay its single-token steps from CUDA graphs of the fixed-shape step: plain
    sessions of rotary spans whose kernels can be captured."""
    return lora is None and deep_prompts is None and cuda.supports_static_step(span) and cuda.capturable(span)


class ServerSession:
    """A client's inference session as this server holds it: KV cache and the padding mask of all tokens so far."""

    def __init__(self, span: SpanModel, batch_size: int, max_length: int, lora: LoraSet | None,
                 deep_prompts: torch.Tensor | None, lease: Lease, session_id: str | None = None,
                 static_steps: bool = False):
        """`static_steps`: run single-token steps as a `cuda.StaticStep` (a CUDA graph on CUDA devices) where
        the span and the session allow it: no LoRA, no deep prompts."""
        self.span, self.id, self.lease = span, session_id, lease
        self.blocks = span.start, span.end
        self.max_length = max_length
        self.cache = span.make_cache(batch_size, max_length)
        self.device = self.cache.device
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)
        self.lora = lora
        self.deep_prompts = deep_prompts.to(self.device, span.compute_dtype) if deep_prompts is not None else None
        usable = static_steps and static_steps_apply(span, lora, deep_prompts)
        self.static = cuda.StaticStep(span, self.cache, use_graph=True) if usable else None

    @property
    def length(self) -> int:
        return self.cache.length

    def free(self) -> None:
        """Drop what the lease paid for, and the blocks (a server that moved frees them); no more steps."""
        self.cache = self.lora = self.deep_prompts = self.static = self.span = None

    def step(self, hidden: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor | None,
             edits: CacheEdits | None = None) -> torch.Tensor:
        """Run new tokens through the span, extending the cache (compute thread), after `edits` to what it holds."""
        batch, new = hidden.shape[:2]
        if batch != self.cache.batch_size:
            raise RequestError(f"step has batch {batch} but the session was opened with {self.cache.batch_size}")
        if edits is not None:
            self._edit(edits, batch)
        if self.length + new > self.max_length:
            raise RequestError(f"session length {self.length + new} would exceed its max_length {self.max_length}")
        chunk = mask.to(self.device) if mask is not None else torch.ones(batch, new, dtype=torch.long,
                                                                         device=self.device)
        full_mask = torch.cat([self.mask, chunk], dim=1)
        pos = position_ids.to(self.device) if position_ids is not None else None
        hidden_in = hidden.to(self.device, self.span.compute_dtype)
        with torch.inference_mode():
            out = self._static_step(hidden_in, full_mask, pos) if self.static is not None and new == 1 else None
            if out is None:
                with lora_lib.activate(self.lora):
                    out = self.span(hidden_in, full_mask, pos, cache=self.cache, deep_prompts=self.deep_prompts)
        self.mask = full_mask
        return out.to("cpu", hidden.dtype)

    def _static_step(self, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor | None:
        """One token per row through the fixed-shape step; None (and plain steps from now on) if it cannot run."""
        if pos is None:
            pos = torch.full((hidden.shape[0], 1), self.length, dtype=torch.long, device=self.device)
        try:
            return self.static(hidden, mask, pos)
        except RuntimeError as e:  # e.g. a kernel that cannot be captured in a CUDA graph
            logger.warning(f"fixed-shape step failed ({type(e).__name__}: {e}); this session steps normally")
            self.static = None
            return None

    def _edit(self, edits: CacheEdits, batch: int) -> None:
        """Apply the edits in a fixed order: reorder rows, then truncate and hide, then reset rows."""
        if edits.reorder is not None:
            if not bool(((edits.reorder >= 0) & (edits.reorder < batch)).all()):
                raise RequestError("'reorder' indices must lie in [0, batch)")
            self.cache.reorder(edits.reorder)
            self.mask = self.mask[edits.reorder.to(self.device)]
        if edits.truncate is not None:
            shortest = self.cache.shortest_truncation  # sliding blocks keep only so much beyond their window
            if not shortest <= edits.truncate <= self.length:
                raise RequestError(f"'truncate' must lie in [{shortest}, {self.length}]: the session's length, and "
                                   f"the shortest its sliding-window blocks can go back to")
            if edits.keep is not None:
                if not bool(((edits.keep >= 0) & (edits.keep <= edits.truncate)).all()):
                    raise RequestError("'keep' must lie in [0, truncate]")
                columns = torch.arange(self.length, device=self.device)
                self.mask = self.mask.masked_fill(columns >= edits.keep.to(self.device)[:, None], 0)
            self.cache.truncate(edits.truncate)
            self.mask = self.mask[:, :edits.truncate]
        if edits.reset is not None:
            if not bool(((edits.reset >= 0) & (edits.reset < batch)).all()):
                raise RequestError("'reset' rows must lie in [0, batch)")
            self.mask[edits.reset.to(self.device)] = 0
