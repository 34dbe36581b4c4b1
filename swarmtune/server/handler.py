"""The RPCs a server answers, over hivemind's P2P: info, forward, backward and inference sessions.

Each RPC carries one `wire` message. Unary RPCs take small messages only (transport.UNARY_BYTES: a
daemon reads a unary call whole before any check); the `_stream` variants take and return any size,
in frames read one at a time as admission allows. Every failure becomes an error reply naming the
problem, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from swarmtune import transport, wire
from swarmtune.adapters.lora import ClientLora
from swarmtune.models.span import SpanModel
from swarmtune.security import Membership
from swarmtune.server import compute, cuda, working_memory
from swarmtune.server.executor import BACKWARD, FORWARD, INFERENCE, PriorityExecutor
from swarmtune.server.faults import Faults
from swarmtune.server.graphs import KeptGraphs
from swarmtune.server.hosted_adapters import hosted_for
from swarmtune.server.lora import LoraSet, lora_slots
from swarmtune.server.lora_cache import LoraCache
from swarmtune.server.mailbox import Mailbox
from swarmtune.server.rate_limit import RateLimiter, Tarpit
from swarmtune.server.receiving import Intake, ReceiveBudget
from swarmtune.server.requests import (
    Limits,
    PeerOverLimit,
    RequestError,
    ServerBusy,
    SpanRequest,
    build_lora,
    check_deep_prompts,
    check_hidden,
    check_mask,
    check_positions,
    get_int,
    need,
    parse_lora,
    parse_span_request,
    requested_blocks,
)
from swarmtune.server.sessions import CacheBudget, CacheEdits, ServerSession, static_steps_apply
from swarmtune.server.streams import Frames, serve_on_demand

logger = logging.getLogger(__name__)
MAX_POSITION = 1 << 24
ATTENTION_SCALE = 1024  # context length at which a token's attention costs about as much as the rest of it
REFUSAL_WEIGHT = 100    # a malformed request counts as this many toward its peer's request rate
COST_PER_REQUEST = 64   # compute (tokens x (1 + positions / ATTENTION_SCALE)) that counts as one request more
OPEN_SECONDS = 1.0      # reserving the whole KV budget counts as this many seconds of the peer's request rate
SMALL_HEADER = 256      # arrays and maps in a header parsed on the event loop: any request but one that ships LoRA
CONTAINERS_PER_REQUEST = 64  # a larger header counts as one request per this many (parsing costs)


@dataclass
class HandlerConfig:
    limits: Limits = field(default_factory=Limits)
    session_timeout: float = 60.0     # idle inference sessions are closed after this long
    alloc_timeout: float = 10.0       # how long a session waits for KV memory
    lora_cache_per_peer: int = 4      # adapter versions remembered per client (digest reuse)
    faults: Faults = field(default_factory=Faults)  # test-only misbehaviour
    graph_bytes: int = 512 << 20      # forward graphs kept for their backward (0: always recompute)
    graph_ttl: float = 120.0          # seconds a kept graph waits for its backward
    evict_idle_after: float = 1.0     # a session idle this long may be evicted for a peer that waits for memory
    cuda_graphs: bool = True          # plain single-token steps replay a CUDA graph (CUDA devices only)
    working_bytes: int | None = None  # activations of the requests computing at once (None: working_memory.auto_bytes)


def _response(meta: dict, tensors: dict | None = None) -> bytes:
    return wire.pack(meta, tensors)


def _error(message: str, retry: bool = False) -> bytes:
    return wire.pack({"error": message, "retry": retry})


class BlockServicer(ServicerBase):
    """Serves blocks [span.start, span.end) of one model."""

    def __init__(self, span: SpanModel, executor: PriorityExecutor, budget: CacheBudget, config: HandlerConfig,
                 info: dict, adapters: dict[str, ClientLora] | None = None,
                 membership: Membership | None = None):
        self.span = span
        self.executor = executor
        self.budget = budget
        self.config = config
        self.limits = config.limits
        self.info = info
        self.membership = membership or Membership()
        self.adapters = adapters or {}  # hosted adapters' LoRA as read; `hosted_adapters`: for the span served
        self.hidden_size = span.config.hidden_size
        self.num_blocks = span.config.num_hidden_layers
        self.device = next(span.parameters()).device
        self.slots = lora_slots(span)
        self.hosted_adapters = hosted_for(self.adapters, span, self.slots, {})
        self.subspans: dict[tuple[int, int], SpanModel] = {}
        self.lora_cache = LoraCache(config.lora_cache_per_peer)
        self.sessions_per_peer: dict[str, int] = defaultdict(int)
        self.streams_per_peer: dict[str, int] = defaultdict(int)
        self.sessions: set[ServerSession] = set()
        self.stats = defaultdict(int)
        self.rates = RateLimiter(self.limits.requests_per_second_per_peer)
        self.tarpit = Tarpit(self.limits.refusal_delay)
        self.tokens_in_flight: dict[str, int] = defaultdict(int)
        self.mailboxes: dict[str, Mailbox] = {}  # session id -> pushes from the previous server
        self.graphs = KeptGraphs(config.graph_bytes, config.graph_ttl)
        # a peer may hold one whole message, plus its frames' framing (the membership token in each)
        self.receiving = ReceiveBudget(self.limits.max_receiving_bytes,
                                       self.limits.max_message_bytes + self.limits.max_message_bytes // 16)
        self.p2p = None  # set by add_p2p_handlers: servers push outputs to the next server of a chain
        self._parser = ThreadPoolExecutor(1, thread_name_prefix="headers")
        self._sweeper: asyncio.Task | None = None

    async def add_p2p_handlers(self, p2p, *args, **kwargs) -> None:
        self.p2p = p2p
        await super().add_p2p_handlers(p2p, *args, **kwargs)
        for name, handler in self._streaming_rpcs().items():  # not through hivemind, which reads ahead
            await serve_on_demand(p2p, self._get_handle_name(None, name), handler)
        self._sweeper = asyncio.create_task(self._expire_graphs())

    async def remove_p2p_handlers(self, p2p, *args, **kwargs) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._parser.shutdown(wait=False, cancel_futures=True)
        for name in self._streaming_rpcs():
            await p2p.remove_binary_stream_handler(self._get_handle_name(None, name))
        await super().remove_p2p_handlers(p2p, *args, **kwargs)

    def _streaming_rpcs(self) -> dict:
        """Handle name (as clients call it) -> handler of every streaming RPC."""
        return {"rpc_spans": self.serve_spans, "rpc_forward_stream": self.serve_forward_stream,
                "rpc_backward_stream": self.serve_backward_stream, "rpc_push_stream": self.serve_push_stream,
                "rpc_inference": self.serve_inference}

    async def _expire_graphs(self) -> None:
        """Kept graphs past their age go even when no request comes along to push them out."""
        while True:
            await asyncio.sleep(self.graphs.ttl / 8)
            self.graphs.expire()

    def serve(self, span: SpanModel) -> None:
        """Serve `span` from now on: a server grows its span block by block as it loads, and shrinks it as it moves.

        What was kept for blocks no longer served goes: idle sessions on them end now (a busy one after
        its step), with their caches and the blocks they hold; so do graphs kept for backward passes.
        """
        self.span, self.slots, self.subspans = span, lora_slots(span), {}
        self.hosted_adapters = hosted_for(self.adapters, span, self.slots, self.hosted_adapters)
        self.info = dict(self.info, start=span.start, end=span.end)
        for session in list(self.sessions):
            if not self.serves(*session.blocks) and session.lease.idle_since is not None:
                self.budget.evict(session.lease)
        for key in [key for key in self.graphs.items if not self.serves(*key[2:])]:
            self.graphs.drop(key)

    def serves(self, start: int, end: int) -> bool:
        return self.span.start <= start and end <= self.span.end

    # ---- helpers -------------------------------------------------------------------------------

    def subspan(self, start: int, end: int) -> SpanModel:
        if (start, end) not in self.subspans:
            self.subspans[(start, end)] = self.span.part(start, end)
        return self.subspans[(start, end)]

    async def _decode(self, data: bytes, peer: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """`wire.unpack`. A large header (up to wire.MAX_CONTAINERS arrays and maps, up to milliseconds of parsing)
        counts toward the peer's rate by its size before it is parsed, and is parsed on a thread of its own, so
        that the event loop goes on serving meanwhile."""
        containers = wire.containers_bound(data)
        if containers <= SMALL_HEADER:
            return wire.unpack(data, self.limits.max_message_bytes)
        cost = containers / CONTAINERS_PER_REQUEST
        if not self.rates.admit(peer, cost):
            raise PeerOverLimit(f"rate limit: a header of up to {containers} arrays and maps counts as {cost:.0f} "
                                f"requests, more than this peer has left of its "
                                f"{self.limits.requests_per_second_per_peer:g} requests/s")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._parser, wire.unpack, data, self.limits.max_message_bytes)

    def _admit(self, peer: str, token: str) -> None:
        if not self.membership.admits(peer, token):
            self.stats["refused_outsiders"] += 1
            raise RequestError(f"peer {peer} is not a member of this private swarm")

    def _check_rate(self, peer: str) -> None:
        if not self.rates.admit(peer):
            raise PeerOverLimit(f"rate limit: more than {self.limits.requests_per_second_per_peer:g} requests/s "
                                f"from this peer")

    async def _refused(self, peer: str, error: RequestError | wire.WireError) -> bytes:
        """The error reply to a refused request. A malformed one (the client's fault, not a busy server) counts
        REFUSAL_WEIGHT times toward the peer's request rate: refusing costs the server too, and honest clients
        rarely send one. One for the peer's own excess goes out after the tarpit's delay."""
        self.stats["rejected"] += 1
        retry = getattr(error, "retry", False)
        if not retry:
            self.rates.charge(peer, REFUSAL_WEIGHT - 1)
        elif isinstance(error, PeerOverLimit) and await self.tarpit.hold(peer):
            self.stats["refusals_held"] += 1
        return _error(str(error), retry)

    async def _compute(self, peer: str, tokens: int, context: int, priority: int, memory: int, fn, *args):
        """Run `fn` on the compute thread, within the peer's budget of tokens in flight, charged to the peer's
        fair share of compute and to its request rate by its cost: `tokens` new tokens, each attending to
        `context` positions; holding `memory` bytes of working memory (`working_memory.admit`) while it runs."""
        if self.tokens_in_flight[peer] + tokens > self.limits.max_tokens_in_flight_per_peer:
            raise PeerOverLimit(f"this peer already has {self.tokens_in_flight[peer]} tokens in flight "
                                f"(limit {self.limits.max_tokens_in_flight_per_peer})")
        cost = tokens * (1 + context / ATTENTION_SCALE) * (2 if priority == BACKWARD else 1)
        self.rates.charge(peer, cost / COST_PER_REQUEST)  # admitted already: what it costs delays the next
        self.tokens_in_flight[peer] += tokens
        try:
            return await self.executor.submit(priority, fn, *args, peer=peer, cost=cost, memory=memory)
        finally:
            self.tokens_in_flight[peer] -= tokens
            if not self.tokens_in_flight[peer]:
                del self.tokens_in_flight[peer]

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

    def _parse(self, meta: dict, tensors: dict, peer: str, backward: bool) -> tuple[SpanRequest, LoraSet | None, int]:
        req = parse_span_request(meta, tensors, (self.span.start, self.span.end), self.num_blocks, self.hidden_size,
                                 MAX_POSITION, self.limits, backward=backward)
        lora = self.resolve_lora(peer, req.lora_meta, req.lora_tensors, req.start, req.end)
        seed = int(req.lora_meta.get("seed", 0)) if req.lora_meta else 0
        return req, lora, seed

    async def _forward(self, meta: dict, tensors: dict, peer: str) -> bytes:
        req, lora, seed = self._parse(meta, tensors, peer, backward=False)
        await self.config.faults.wait()
        span, (batch, length) = self.subspan(req.start, req.end), req.hidden.shape[:2]
        args = (span, req.hidden, req.attention_mask, req.position_ids, req.deep_prompts, lora, seed)
        if req.keep is not None and self.graphs.wanted(compute.graph_bytes(span, req.hidden)):
            memory = self.executor.memory.admit(span, working_memory.KEEPING, batch, length, 0, "a forward")
            graph, out = await self._compute(peer, batch * length, length, FORWARD, memory, _forward_keeping, *args)
            self.graphs.put((peer, req.keep, req.start, req.end), graph)
        else:
            memory = self.executor.memory.admit(span, working_memory.FORWARD, batch, length, 0, "a forward")
            out = await self._compute(peer, batch * length, length, FORWARD, memory, compute.forward, *args)
        self.stats["forward"] += 1
        return _response({"ok": True}, {"hidden": self.config.faults.corrupt(out)})

    async def _backward(self, meta: dict, tensors: dict, peer: str) -> bytes:
        req, lora, seed = self._parse(meta, tensors, peer, backward=True)
        await self.config.faults.wait()
        span, (batch, length) = self.subspan(req.start, req.end), req.hidden.shape[:2]
        graph = self.graphs.take((peer, req.keep, req.start, req.end)) if req.keep is not None else None
        if graph is not None and torch.equal(graph.received, req.hidden):  # the forward we kept: no recompute
            self.stats["backward_from_kept_graph"] += 1
            memory = self.executor.memory.admit(span, working_memory.GRADIENTS, batch, length, 0, "a backward")
            grads = await self._compute(peer, batch * length, length, BACKWARD, memory, compute.backward_through,
                                        graph, req.grad_output)
        else:
            memory = self.executor.memory.admit(span, working_memory.BACKWARD, batch, length, 0, "a backward")
            grads = await self._compute(peer, batch * length, length, BACKWARD, memory, compute.backward, span,
                                        req.hidden, req.attention_mask, req.position_ids, req.deep_prompts, lora,
                                        req.grad_output, seed)
        grad_hidden, grad_deep, grad_lora = grads
        tensors = {"grad_hidden": self.config.faults.corrupt(grad_hidden)}
        if grad_deep is not None:
            tensors["grad_deep_prompts"] = grad_deep
        if req.lora_meta is not None and "adapter" not in req.lora_meta:
            for i in range(len(grad_lora) // 2):
                tensors[f"grad.lora.A.{i}"], tensors[f"grad.lora.B.{i}"] = grad_lora[2 * i], grad_lora[2 * i + 1]
        self.stats["backward"] += 1
        return _response({"ok": True}, tensors)

    async def _on_channel(self, meta: dict, tensors: dict, peer: str) -> bytes:
        method = meta.get("method")
        need(method in ("forward", "backward"), "a channel request's 'method' must be forward or backward")
        return await (self._forward if method == "forward" else self._backward)(meta, tensors, peer)

    def _admission(self, peer: str, member: bool = True):
        """What a stream checks on the first frame of each message, before it reads any more of it: the
        caller's membership (unless `member` is known already) and its request rate."""
        def check(token: str) -> None:
            if not member:
                self._admit(peer, token)
            self._check_rate(peer)
        return check

    async def _guarded(self, handler, data: bytes, context: P2PContext, token: str | None) -> bytes:
        """Decode, check the caller, run `handler(meta, tensors, peer)`; every failure becomes an error reply.
        A unary call passes its `token` and is admitted and charged here; a stream (`token` None) did both
        on the message's frames."""
        peer = str(context.remote_id)
        intake = Intake(self.receiving, peer)
        try:
            if token is not None:
                need(len(data) <= transport.UNARY_BYTES,
                     f"a unary call carries at most {transport.UNARY_BYTES} bytes, not {len(data)}: send larger "
                     f"messages as a stream")
                self._admission(peer, member=False)(token)
                intake.charge(len(data))
            meta, tensors = await self._decode(data, peer)
            return await handler(meta, tensors, peer)
        except (RequestError, wire.WireError) as e:
            return await self._refused(peer, e)
        except Exception as e:
            logger.exception("request failed")
            self.stats["failed"] += 1
            return _error(f"server error: {type(e).__name__}: {e}", retry=True)
        finally:
            intake.release()

    # ---- unary RPCs -------------------------------------------------------------------------------

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """The server's state; a request like any other toward the peer's rate (clients ping with it)."""
        peer = str(context.remote_id)
        if not self.membership.admits(peer, request.uid):
            return runtime_pb2.ExpertResponse(metadata=_error("not a member of this private swarm"))
        try:
            self._check_rate(peer)
        except PeerOverLimit as e:
            return runtime_pb2.ExpertResponse(metadata=await self._refused(peer, e))
        meta = dict(self.info, cache_bytes_free=self.budget.free, active_sessions=len(self.sessions),
                    graph_bytes_kept=self.graphs.nbytes, receiving_bytes=self.receiving.used,
                    evictions=self.budget.evictions, working_bytes=self.executor.memory.used,
                    working_bytes_max=self.executor.memory.max_bytes, stats=dict(self.stats))
        return runtime_pb2.ExpertResponse(metadata=_response(meta))

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """The previous server of a chain delivers its output for one step of one of our sessions."""
        return runtime_pb2.ExpertResponse(
            metadata=await self._guarded(self._accept_push, request.metadata, context, request.uid))

    async def _accept_push(self, meta: dict, tensors: dict, peer: str) -> bytes:
        mailbox = self.mailboxes.get(meta.get("session"))
        need(mailbox is not None, "push for an unknown session")
        if not mailbox.admits(meta.get("key")):
            self.stats["pushes_refused"] += 1
            raise RequestError("push refused: it lacks the push key the session's client gave this hop")
        step = get_int(meta, "step", 0, 2**31)
        mailbox.put(step, check_hidden(tensors.get("hidden"), "hidden", self.hidden_size, self.limits))
        self.stats["pushes_received"] += 1
        return _response({"ok": True})

    async def _push(self, target: dict, step: int, hidden: torch.Tensor) -> None:
        """Send our output to the next server of the chain; if this fails, the client sends it instead."""
        try:
            data = wire.pack({"session": target["session"], "key": target["key"], "step": step}, {"hidden": hidden})
            token = self.membership.token(str(self.p2p.peer_id))
            await transport.call(self.p2p, target["peer"], "push", data, timeout=10, token=token)
        except Exception as e:
            logger.debug(f"push to {target.get('peer')} failed: {e}")

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(
            metadata=await self._guarded(self._forward, request.metadata, context, request.uid))

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext
                           ) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(
            metadata=await self._guarded(self._backward, request.metadata, context, request.uid))

    # ---- streaming RPCs ---------------------------------------------------------------------------

    async def _stream(self, handler, requests: Frames, context: P2PContext
                      ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        peer = str(context.remote_id)
        intake = Intake(self.receiving, peer, self.config.session_timeout)
        try:
            try:
                data = await asyncio.wait_for(
                    _read_message(requests, wire.Reassembler(self.limits.max_message_bytes),
                                  self._admission(peer, member=False), intake),
                    self.config.session_timeout)
                need(data is not None, "the stream ended before a whole message arrived")
                reply = await self._guarded(handler, data, context, None)
                del data
            except asyncio.TimeoutError:
                reply = _error(intake.timed_out(f"no whole message within {self.config.session_timeout:.0f} s"),
                               retry=True)
            except (RequestError, wire.WireError) as e:
                reply = await self._refused(peer, e)
            for frame in wire.frames(reply):
                yield runtime_pb2.ExpertResponse(metadata=frame)
        finally:  # the request's bytes stay charged until its reply has gone
            intake.release()
        await _drain(requests)

    async def serve_push_stream(self, requests: Frames, context: P2PContext
                                ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A push too large for a unary call (`rpc_push`)."""
        async for response in self._counted(context, self._stream(self._accept_push, requests, context)):
            yield response

    async def serve_spans(self, requests: Frames, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A client's channel for forward and backward requests (`_channel`)."""
        async for response in self._counted(context, self._channel(requests, context)):
            yield response

    async def _channel(self, requests: Frames, context: P2PContext
                       ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A client's long-lived channel for forward and backward requests ('method' in each), answered in order.

        Reusing one stream saves opening a libp2p stream per request, and lets its flow-control
        window grow once instead of for every large request over a slow link.
        """
        reassembler = wire.Reassembler(self.limits.max_message_bytes)
        admission, peer = None, str(context.remote_id)
        intake = Intake(self.receiving, peer, self.config.session_timeout)
        try:
            while True:
                admission = admission or self._admission(peer, member=False)
                data = await asyncio.wait_for(_read_message(requests, reassembler, admission, intake),
                                                 self.config.session_timeout)
                if data is None:
                    return
                admission = self._admission(peer)  # a member now: later messages only count toward its rate
                reply = await self._guarded(self._on_channel, data, context, None)
                del data
                for frame in wire.frames(reply):
                    yield runtime_pb2.ExpertResponse(metadata=frame)
                intake.release()
        except asyncio.TimeoutError:  # idle: the client opens a new channel when it needs one
            if intake.short_of_room is not None:  # or stuck: say why
                yield _frame(_error(intake.timed_out(f"no whole message within {self.config.session_timeout:.0f} s"),
                                    retry=True))
        except (RequestError, wire.WireError) as e:  # refused on a first frame, or the framing is broken
            yield _frame(await self._refused(peer, e))
            await _drain(requests)
        finally:
            intake.release()

    async def serve_forward_stream(self, requests: Frames, context: P2PContext
                                   ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._counted(context, self._stream(self._forward, requests, context)):
            yield response

    async def serve_backward_stream(self, requests: Frames, context: P2PContext
                                    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._counted(context, self._stream(self._backward, requests, context)):
            yield response

    async def serve_inference(self, requests: Frames, context: P2PContext
                              ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A generation session: an 'open' message, then steps, each answered with the span's output."""
        async for response in self._counted(context, self._session(requests, context)):
            yield response

    async def _counted(self, context: P2PContext, responses: AsyncIterator[runtime_pb2.ExpertResponse]
                       ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """`responses`, while the stream counts toward its peer's open streams (each holds a socket, a task and
        the frame it is reading)."""
        peer = str(context.remote_id)
        if self.streams_per_peer[peer] >= self.limits.max_streams_per_peer:
            yield _frame(await self._refused(peer, PeerOverLimit(
                f"this peer has {self.streams_per_peer[peer]} streams open here "
                f"(limit {self.limits.max_streams_per_peer})")))
            return
        self.streams_per_peer[peer] += 1
        try:
            async for response in responses:
                yield response
        finally:
            await responses.aclose()
            self.streams_per_peer[peer] -= 1
            if not self.streams_per_peer[peer]:
                del self.streams_per_peer[peer]

    async def _session(self, requests: Frames, context: P2PContext
                       ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        peer = str(context.remote_id)
        reassembler = wire.Reassembler(self.limits.max_message_bytes)
        intake = Intake(self.receiving, peer, self.config.session_timeout)
        session = None

        def admit_step(token: str) -> None:  # a step that has begun to arrive is not idle
            self._admission(peer)(token)
            session.lease.idle_since = None

        try:
            data = await asyncio.wait_for(
                _read_message(requests, reassembler, self._admission(peer, member=False), intake),
                self.config.session_timeout)
            if data is None:
                return
            session = await self._open_session(data, peer)
            del data
            intake.release()
            yield _frame(_response({"ok": True, "opened": True}))
            while True:
                data = await asyncio.wait_for(_read_message(requests, reassembler, admit_step, intake),
                                                 self.config.session_timeout)
                if data is None:
                    return
                reply = await self._inference_step(session, data, peer)
                del data
                for frame in wire.frames(reply):
                    yield runtime_pb2.ExpertResponse(metadata=frame)
                intake.release()
        except asyncio.TimeoutError:
            yield _frame(_error(intake.timed_out(f"session idle for more than {self.config.session_timeout:.0f} s"),
                                retry=True))
        except (RequestError, wire.WireError) as e:
            yield _frame(await self._refused(peer, e))
            await _drain(requests)
        except Exception as e:
            logger.exception("inference session failed")
            yield _frame(_error(f"server error: {type(e).__name__}: {e}", retry=True))
            await _drain(requests)
        finally:
            intake.release()
            if session is not None:
                self.mailboxes.pop(session.id, None)
                session.free()
                self.budget.release(session.lease)
                self.sessions_per_peer[peer] -= 1
                if not self.sessions_per_peer[peer]:
                    del self.sessions_per_peer[peer]
                self.sessions.discard(session)

    async def _open_session(self, data: bytes, peer: str) -> ServerSession:
        """A new session, holding its lease of the KV budget. Everything is checked before the reservation,
        and any error after it releases it."""
        meta, tensors = await self._decode(data, peer)
        need(meta.get("type") == "open", "the first message of a session must be of type 'open'")
        start, end = requested_blocks(meta, (self.span.start, self.span.end), self.num_blocks)
        batch = get_int(meta, "batch_size", 1, self.limits.max_batch)
        max_length = get_int(meta, "max_length", 1, self.limits.max_length)
        session_id, push_key = meta.get("session_id"), _push_key(meta)
        need(session_id is None or (isinstance(session_id, str) and 16 <= len(session_id) <= 64),
             "'session_id' must be a string of 16 to 64 characters")
        if self.sessions_per_peer[peer] >= self.limits.max_sessions_per_peer:
            raise PeerOverLimit(f"too many open sessions from this peer (limit {self.limits.max_sessions_per_peer})")
        lora_meta, lora_tensors = parse_lora(meta, tensors)
        lora = self.resolve_lora(peer, lora_meta, lora_tensors, start, end)
        deep_prompts = check_deep_prompts(tensors.get("deep_prompts"), end - start, batch, self.hidden_size, max_length)
        span = self.subspan(start, end)
        itemsize = torch.empty((), dtype=span.compute_dtype).element_size()
        nbytes = span.make_cache_nbytes(batch, max_length)  # what the session holds: its cache, prompts, adapter
        nbytes += deep_prompts.numel() * itemsize if deep_prompts is not None else 0
        if lora is not None and lora_meta is not None and "adapter" not in lora_meta:
            nbytes += sum(t.numel() * t.element_size() for t in lora.tensors())
        static = self.config.cuda_graphs and self.device.type == "cuda" and static_steps_apply(span, lora, deep_prompts)
        nbytes += cuda.static_step_nbytes(span, batch, max_length) if static else 0
        self.budget.check_fits(nbytes)  # else the client's error, not a cost
        self._charge_open(peer, nbytes)
        lease = await self.budget.acquire(peer, nbytes, self.config.alloc_timeout)
        try:
            need(session_id not in self.mailboxes, "'session_id' is already in use: choose a new one")
            session = ServerSession(span, batch, max_length, lora, deep_prompts, lease, session_id,
                                    static_steps=static)
        except BaseException:
            self.budget.release(lease)
            raise
        lease.on_evict = session.free
        if session_id is not None:
            self.mailboxes[session_id] = Mailbox(push_key)
        self.sessions_per_peer[peer] += 1
        self.sessions.add(session)
        return session

    def _charge_open(self, peer: str, nbytes: int) -> None:
        """An open costs the server its reservation (allocated and zeroed now, held for the session): it counts
        toward the peer's rate by its share of the KV budget, so that opening and closing sessions in a loop
        is as limited as any other flood."""
        cost = 1 + OPEN_SECONDS * self.limits.requests_per_second_per_peer * nbytes / max(1, self.budget.max_bytes)
        if not self.rates.admit(peer, cost):
            raise PeerOverLimit(f"rate limit: a session of {nbytes} bytes of KV memory counts as {cost:.0f} "
                                f"requests, more than this peer has left of its "
                                f"{self.limits.requests_per_second_per_peer:g} requests/s")

    async def _inference_step(self, session: ServerSession, data: bytes, peer: str) -> bytes:
        """One step. Its hidden states come in the message, or (chaining) pushed by the previous server;
        the output goes back to the client and, when asked, on to the next server."""
        if not self.serves(*session.blocks):
            raise ServerBusy(f"this server no longer serves blocks {session.blocks[0]}:{session.blocks[1]} (it "
                             f"moved): open the session on another server")
        if session.lease.evicted:
            self.stats["evicted_steps"] += 1
            raise ServerBusy("this session was evicted: its peer held more than its fair share of the server's "
                             "KV memory while other peers waited for some; open a new one (elsewhere, or later)")
        session.lease.idle_since = None
        try:
            return await self._run_step(session, data, peer)
        finally:
            session.lease.idle_since = time.monotonic()
            if session.lease.evicted:  # during the step: its cache goes now
                session.free()

    async def _run_step(self, session: ServerSession, data: bytes, peer: str) -> bytes:
        meta, tensors = await self._decode(data, peer)
        hidden = tensors.get("hidden")
        push_key = _push_key(meta)
        if push_key is not None and session.id is not None:  # the chain changed: another server pushes now
            self.mailboxes[session.id].rekey(push_key)
        if hidden is None and meta.get("await_push") and session.id is not None:
            step = get_int(meta, "step", 0, 2**31)
            wait = meta.get("push_wait", 1.0)
            need(isinstance(wait, (int, float)) and 0 <= wait <= 60, "'push_wait' must be in [0, 60] seconds")
            hidden = await self.mailboxes[session.id].take(step, wait)
            if hidden is None:
                self.stats["pushes_missed"] += 1
                return _response({"ok": True, "need_hidden": True})
        hidden = check_hidden(hidden, "hidden", self.hidden_size, self.limits)
        batch, length = hidden.shape[:2]
        mask = check_mask(tensors.get("attention_mask"), batch, length)
        pos = check_positions(tensors.get("position_ids"), batch, length, MAX_POSITION)
        edits = _cache_edits(meta, tensors, batch)
        memory = self.executor.memory.admit(self.subspan(*session.blocks), working_memory.FORWARD, batch, length,
                                            session.length, "an inference step")
        await self.config.faults.wait()
        out = self.config.faults.corrupt(
            await self._compute(peer, batch * length, session.length + length, INFERENCE, memory, session.step,
                                hidden, mask, pos, edits))
        self.stats["inference_steps"] += 1
        target = meta.get("push_to")
        if (isinstance(target, dict) and isinstance(target.get("peer"), str) and isinstance(target.get("key"), str)
                and isinstance(meta.get("step"), int)):
            asyncio.create_task(self._push(target, meta["step"], out))
        return _response({"ok": True, "step": meta.get("step"), "length": session.length}, {"hidden": out})


async def _read_message(frames: Frames, reassembler: wire.Reassembler, admission: Callable[[str], None],
                        intake: Intake) -> bytes | None:
    """The next whole message from a stream of frames. Each frame is charged to the peer's `intake` before it is
    read, and `admission` checks the membership token of the first frame before another is read (both raise
    to refuse). None: the stream ended between messages."""
    first = True
    try:
        while (request := await frames.next(intake.reserve)) is not None:
            if first:
                admission(request.uid)
                first = False
            data = reassembler.add(request.metadata)
            if data is not None:
                return data
        return None
    except BaseException:
        # the exception's traceback keeps this frame (and asyncio's wait_for makes that a reference cycle,
        # freed only by a full garbage collection): let go of the message's bytes now
        reassembler.reset()
        request = None  # noqa: F841
        raise


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


def _push_key(meta: dict) -> str | None:
    value = meta.get("push_key")
    need(value is None or isinstance(value, str) and 16 <= len(value) <= 64,
         "'push_key' must be a string of 16 to 64 characters")
    return value


def _forward_keeping(*args) -> tuple[compute.Graph, torch.Tensor]:
    graph = compute.forward_with_graph(*args)
    return graph, compute.output_of(graph)


async def _drain(frames: Frames, timeout: float = 2.0, max_frames: int = 8) -> None:
    """Read what the client still sends until it hangs up, which it does once it has our reply. Closing our end
    while the client's is open makes the daemon reset the stream, and a reset drops whatever the client's daemon
    has not yet read, our reply included. A client that goes on sending, or never hangs up, is cut off."""
    async def until_hang_up():
        for _ in range(max_frames + 2):  # its frames, its end-of-stream marker, then the hang-up
            await frames.next()
            if frames.hung_up:
                return

    with contextlib.suppress(Exception):
        await asyncio.wait_for(until_hang_up(), timeout)


def _frame(message: bytes) -> runtime_pb2.ExpertResponse:
    """A short message (a status or an error) as one stream frame."""
    return runtime_pb2.ExpertResponse(metadata=wire.frames(message)[0])

