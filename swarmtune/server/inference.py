"""Inference sessions: an 'open' message reserving the session's KV cache, then steps, each answered with the
span's output (and, chained, pushed on to the next server)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import torch
from hivemind.proto import runtime_pb2

from swarmtune import wire
from swarmtune.server import cuda, working_memory
from swarmtune.server.admission import Gate, error_reply
from swarmtune.server.executor import INFERENCE
from swarmtune.server.mailbox import Mailbox
from swarmtune.server.pushes import Pushes, push_key
from swarmtune.server.receiving import Intake
from swarmtune.server.requests import (
    PeerOverLimit,
    RequestError,
    ServerBusy,
    check_deep_prompts,
    check_hidden,
    check_mask,
    check_positions,
    get_int,
    need,
    parse_lora,
    requested_blocks,
)
from swarmtune.server.served import MAX_POSITION, Served
from swarmtune.server.sessions import CacheBudget, CacheEdits, ServerSession, static_steps_apply
from swarmtune.server.streams import Frames, drain, frame, read_message, replies

if TYPE_CHECKING:
    from swarmtune.server.handler_config import HandlerConfig

logger = logging.getLogger(__name__)


class InferenceSessions:
    """The sessions open on this server, each holding its lease of the KV budget until its stream ends."""

    def __init__(self, served: Served, gate: Gate, budget: CacheBudget, pushes: Pushes, config: HandlerConfig,
                 stats: defaultdict):
        self.served, self.gate, self.budget, self.pushes, self.stats = served, gate, budget, pushes, stats
        self.config = config
        self.sessions: set[ServerSession] = set()
        self.sessions_per_peer: dict[str, int] = defaultdict(int)

    def end_unserved(self) -> None:
        """Idle sessions on blocks no longer served end now (a busy one after its step)."""
        for session in list(self.sessions):
            if not self.served.serves(*session.blocks) and session.lease.idle_since is not None:
                self.budget.evict(session.lease)

    async def serve(self, requests: Frames, peer: str) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        timeout = self.config.session_timeout
        reassembler = wire.Reassembler(self.gate.limits.max_message_bytes)
        intake = Intake(self.gate.receiving, peer, timeout)
        session = None

        def admit_step(token: str) -> None:  # a step that has begun to arrive is not idle
            self.gate.message_check(peer)(token)
            session.lease.idle_since = None

        try:
            data = await asyncio.wait_for(
                read_message(requests, reassembler, self.gate.message_check(peer, member=False), intake), timeout)
            if data is None:
                return
            session = await self._open(data, peer)
            del data
            intake.release()
            yield frame(wire.pack({"ok": True, "opened": True}))
            while True:
                await self.gate.pace(peer)
                data = await asyncio.wait_for(read_message(requests, reassembler, admit_step, intake), timeout)
                if data is None:
                    return
                reply = await self._step(session, data, peer, time.perf_counter_ns())
                del data
                for response in replies(reply):
                    yield response
                intake.release()
        except asyncio.TimeoutError:
            yield frame(error_reply(intake.timed_out(f"session idle for more than {timeout:.0f} s"), retry=True))
            await drain(requests)  # a step the client sends meanwhile would make the daemon drop this reply
        except (RequestError, wire.WireError) as e:
            yield frame(await self.gate.refused(peer, e))
            await drain(requests)
        except Exception as e:
            logger.exception("inference session failed")
            yield frame(error_reply(f"server error: {type(e).__name__}: {e}", retry=True))
            await drain(requests)
        finally:
            intake.release()
            if session is not None:
                self._close(session, peer)

    def _close(self, session: ServerSession, peer: str) -> None:
        self.pushes.mailboxes.pop(session.id, None)
        session.free()
        self.budget.release(session.lease)
        self.sessions_per_peer[peer] -= 1
        if not self.sessions_per_peer[peer]:
            del self.sessions_per_peer[peer]
        self.sessions.discard(session)

    async def _open(self, data: bytes, peer: str) -> ServerSession:
        """A new session, holding its lease of the KV budget. Everything is checked before the reservation,
        and any error after it releases it."""
        served, limits = self.served, self.gate.limits
        meta, tensors = await self.gate.decode(data, peer)
        need(meta.get("type") == "open", "the first message of a session must be of type 'open'")
        start, end = requested_blocks(meta, served.blocks, served.num_blocks)
        batch = get_int(meta, "batch_size", 1, limits.max_batch)
        max_length = get_int(meta, "max_length", 1, limits.max_length)
        session_id, key = meta.get("session_id"), push_key(meta)
        need(session_id is None or (isinstance(session_id, str) and 16 <= len(session_id) <= 64),
             "'session_id' must be a string of 16 to 64 characters")
        if self.sessions_per_peer[peer] >= limits.max_sessions_per_peer:
            raise PeerOverLimit(f"too many open sessions from this peer (limit {limits.max_sessions_per_peer})")
        lora_meta, lora_tensors = parse_lora(meta, tensors)
        lora = served.resolve_lora(peer, lora_meta, lora_tensors, start, end)
        deep_prompts = check_deep_prompts(tensors.get("deep_prompts"), end - start, batch, served.hidden_size,
                                          max_length)
        span = served.subspan(start, end)
        itemsize = torch.empty((), dtype=span.compute_dtype).element_size()
        nbytes = span.make_cache_nbytes(batch, max_length)  # what the session holds: its cache, prompts, adapter
        nbytes += deep_prompts.numel() * itemsize if deep_prompts is not None else 0
        if lora is not None and lora_meta is not None and "adapter" not in lora_meta:
            nbytes += sum(t.numel() * t.element_size() for t in lora.tensors())
        static = (self.config.cuda_graphs and served.device.type == "cuda"
                  and static_steps_apply(span, lora, deep_prompts))
        nbytes += cuda.static_step_nbytes(span, batch, max_length) if static else 0
        self.budget.check_fits(nbytes)  # else the client's error, not a cost
        self.gate.charge_open(peer, nbytes, self.budget.max_bytes)
        lease = await self.budget.acquire(peer, nbytes, self.config.alloc_timeout)
        try:
            need(session_id not in self.pushes.mailboxes, "'session_id' is already in use: choose a new one")
            session = ServerSession(span, batch, max_length, lora, deep_prompts, lease, session_id,
                                    static_steps=static)
        except BaseException:
            self.budget.release(lease)
            raise
        lease.on_evict = session.free
        if session_id is not None:
            self.pushes.mailboxes[session_id] = Mailbox(key)
        self.sessions_per_peer[peer] += 1
        self.sessions.add(session)
        return session

    async def _step(self, session: ServerSession, data: bytes, peer: str, received_ns: int) -> bytes:
        """One step. Its hidden states come in the message, or (chaining) pushed by the previous server;
        the output goes back to the client and, when asked, on to the next server. `received_ns`: when the
        message was read whole (time.perf_counter_ns), for a step that asks for its trace."""
        if not self.served.serves(*session.blocks):
            raise ServerBusy(f"this server no longer serves blocks {session.blocks[0]}:{session.blocks[1]} (it "
                             f"moved): open the session on another server")
        if session.lease.evicted:
            self.stats["evicted_steps"] += 1
            raise ServerBusy("this session was evicted: its peer held more than its fair share of the server's "
                             "KV memory while other peers waited for some; open a new one (elsewhere, or later)")
        session.lease.idle_since = None
        try:
            return await self._run_step(session, data, peer, received_ns)
        finally:
            session.lease.idle_since = time.monotonic()
            if session.lease.evicted:  # during the step: its cache goes now
                session.free()

    async def _run_step(self, session: ServerSession, data: bytes, peer: str, received_ns: int) -> bytes:
        served, faults = self.served, self.config.faults
        meta, tensors = await self.gate.decode(data, peer)
        trace = [received_ns, time.perf_counter_ns()] if meta.get("trace") is True else None
        hidden = tensors.get("hidden")
        key = push_key(meta)
        if key is not None and session.id is not None:  # the chain changed: another server pushes now
            self.pushes.mailboxes[session.id].rekey(key)
        if hidden is None and meta.get("await_push") and session.id is not None:
            step = get_int(meta, "step", 0, 2**31)
            wait = meta.get("push_wait", 1.0)
            need(isinstance(wait, (int, float)) and 0 <= wait <= 60, "'push_wait' must be in [0, 60] seconds")
            hidden = await self.pushes.mailboxes[session.id].take(step, wait)
            if hidden is None:
                self.stats["pushes_missed"] += 1
                return wire.pack({"ok": True, "need_hidden": True})
        hidden = check_hidden(hidden, "hidden", served.hidden_size, self.gate.limits)
        batch, length = hidden.shape[:2]
        mask = check_mask(tensors.get("attention_mask"), batch, length)
        pos = check_positions(tensors.get("position_ids"), batch, length, MAX_POSITION)
        edits = _cache_edits(meta, tensors, batch)
        memory = self.gate.executor.memory.admit(served.subspan(*session.blocks), working_memory.FORWARD, batch,
                                                 length, session.length, "an inference step")
        await faults.wait()
        step = session.step if trace is None else _traced(session.step, trace)
        out = faults.corrupt(await self.gate.compute(peer, batch * length, session.length + length, INFERENCE, memory,
                                                     step, hidden, mask, pos, edits))
        self.stats["inference_steps"] += 1
        self.pushes.send_on(meta.get("push_to"), meta.get("step"), out)
        reply = {"ok": True, "step": meta.get("step"), "length": session.length}
        if trace is not None:
            reply["trace"] = [*trace, time.perf_counter_ns()]
        return wire.pack(reply, {"hidden": out})


def _traced(fn: Callable[..., torch.Tensor], trace: list[int]) -> Callable[..., torch.Tensor]:
    """`fn`, noting in `trace` when it starts and ends on the compute thread: a step asked for its trace
    (received, decoded, compute began, compute ended, reply ready; the clock of time.perf_counter_ns), so that a
    benchmark on the same machine can tell where a step's time goes."""
    def run(*args) -> torch.Tensor:
        trace.append(time.perf_counter_ns())
        try:
            return fn(*args)
        finally:
            trace.append(time.perf_counter_ns())
    return run


def _cache_edits(meta: dict, tensors: dict, batch: int) -> CacheEdits | None:
    """A step's edits to its session's cache, their types and shapes checked (their values: by the session)."""
    reorder, keep, reset = tensors.get("reorder"), tensors.get("keep"), tensors.get("reset")
    truncate = meta.get("truncate")
    if reorder is None and reset is None and truncate is None:
        need(keep is None, "'keep' needs 'truncate'")
        return None
    integer = (torch.int64, torch.int32)
    if reorder is not None:
        need(reorder.dtype in integer and list(reorder.shape) == [batch],
             f"'reorder' must be an integer tensor of shape [{batch}]")
    if truncate is not None:
        need(type(truncate) is int, "'truncate' must be an integer")
    if keep is not None:
        need(truncate is not None, "'keep' needs 'truncate'")
        need(keep.dtype in integer and list(keep.shape) == [batch],
             f"'keep' must be an integer tensor of shape [{batch}]")
    if reset is not None:
        need(reset.dtype in integer and reset.dim() == 1 and reset.numel() <= batch,
             f"'reset' must be a 1-D integer tensor of at most {batch} rows")
    return CacheEdits(reorder, truncate, keep, reset)
