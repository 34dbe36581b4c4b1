"""The RPCs a server answers, over hivemind's P2P: info, forward, backward, pushes and inference sessions.

Each RPC carries one `wire` message. Unary RPCs take small messages only (transport.UNARY_BYTES: a
daemon reads a unary call whole before any check); the `_stream` variants take and return any size,
in frames read one at a time as admission allows. Every failure becomes an error reply naming the
problem, and the server goes on serving.

`BlockServicer` only routes each RPC to the room that does the work: `admission` (what every request is
checked and charged), `passes` (forward and backward), `inference` (sessions), `pushes` (chained steps)
and `served` (the span and adapters served now).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from swarmtune import wire
from swarmtune.adapters.lora import ClientLora
from swarmtune.models.span import SpanModel
from swarmtune.security import Membership
from swarmtune.server.admission import Gate, error_reply
from swarmtune.server.exchanges import serve_channel, serve_one
from swarmtune.server.executor import PriorityExecutor
from swarmtune.server.graphs import KeptGraphs
from swarmtune.server.handler_config import HandlerConfig
from swarmtune.server.inference import InferenceSessions
from swarmtune.server.passes import Passes
from swarmtune.server.pushes import Pushes
from swarmtune.server.requests import PeerOverLimit
from swarmtune.server.served import Served
from swarmtune.server.sessions import CacheBudget
from swarmtune.server.streams import Frames, serve_on_demand

INFO_COST = 10  # requests an info call counts as, toward its peer's rate


class BlockServicer(ServicerBase):
    """Serves blocks [span.start, span.end) of one model."""

    def __init__(self, span: SpanModel, executor: PriorityExecutor, budget: CacheBudget, config: HandlerConfig,
                 info: dict, adapters: dict[str, ClientLora] | None = None,
                 membership: Membership | None = None):
        self.budget, self.config, self.info = budget, config, info
        self.stats = defaultdict(int)
        self.served = Served(span, adapters or {}, config.limits, config.lora_cache_per_peer)
        self.gate = Gate(config.limits, membership or Membership(), executor, self.stats)
        self.graphs = KeptGraphs(config.graph_bytes, config.graph_ttl)
        self.passes = Passes(self.served, self.gate, self.graphs, config.faults, self.stats)
        self.pushes = Pushes(self.served.hidden_size, config.limits, self.gate.membership, self.stats)
        self.inference = InferenceSessions(self.served, self.gate, budget, self.pushes, config, self.stats)
        self._sweeper: asyncio.Task | None = None

    @property
    def span(self) -> SpanModel:
        return self.served.span

    @property
    def hosted_adapters(self) -> dict:
        return self.served.hosted_adapters

    async def add_p2p_handlers(self, p2p, *args, **kwargs) -> None:
        self.pushes.p2p = p2p  # servers push outputs to the next server of a chain
        await super().add_p2p_handlers(p2p, *args, **kwargs)
        for name, handler in self._streaming_rpcs().items():  # not through hivemind, which reads ahead
            await serve_on_demand(p2p, self._get_handle_name(None, name), handler)
        self._sweeper = asyncio.create_task(self._expire_graphs())

    async def remove_p2p_handlers(self, p2p, *args, **kwargs) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.gate.close()
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
        self.served.serve(span)
        self.info = dict(self.info, start=span.start, end=span.end)
        self.inference.end_unserved()
        for key in [key for key in self.graphs.items if not self.served.serves(*key[2:])]:
            self.graphs.drop(key)

    # ---- unary RPCs -------------------------------------------------------------------------------

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """The server's state. It counts INFO_COST requests toward the peer's rate: clients ping with it a few times a
        minute, and its answer (the whole state, packed) costs the event loop more than most refusals."""
        peer, gate = str(context.remote_id), self.gate
        if not gate.membership.admits(peer, request.uid):
            return runtime_pb2.ExpertResponse(metadata=error_reply("not a member of this private swarm"))
        try:
            gate.check_rate(peer, INFO_COST)
        except PeerOverLimit as e:
            return runtime_pb2.ExpertResponse(metadata=await gate.refused(peer, e))
        memory = gate.executor.memory
        meta = dict(self.info, cache_bytes_free=self.budget.free, active_sessions=len(self.inference.sessions),
                    graph_bytes_kept=self.graphs.nbytes, receiving_bytes=gate.receiving.used,
                    evictions=self.budget.evictions, working_bytes=memory.used, working_bytes_max=memory.max_bytes,
                    stats=dict(self.stats))
        return runtime_pb2.ExpertResponse(metadata=wire.pack(meta))

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """The previous server of a chain delivers its output for one step of one of our sessions."""
        return await self._unary(self.pushes.accept, request, context)

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._unary(self.passes.forward, request, context)

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext
                           ) -> runtime_pb2.ExpertResponse:
        return await self._unary(self.passes.backward, request, context)

    async def _unary(self, handler, request: runtime_pb2.ExpertRequest, context: P2PContext
                     ) -> runtime_pb2.ExpertResponse:
        reply = await self.gate.guarded(handler, request.metadata, str(context.remote_id), request.uid)
        return runtime_pb2.ExpertResponse(metadata=reply)

    # ---- streaming RPCs: each counts toward its peer's open streams ---------------------------------

    async def serve_push_stream(self, requests: Frames, context: P2PContext
                                ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A push too large for a unary call (`rpc_push`)."""
        async for response in self._one(self.pushes.accept, requests, context):
            yield response

    async def serve_forward_stream(self, requests: Frames, context: P2PContext
                                   ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._one(self.passes.forward, requests, context):
            yield response

    async def serve_backward_stream(self, requests: Frames, context: P2PContext
                                    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._one(self.passes.backward, requests, context):
            yield response

    async def serve_spans(self, requests: Frames, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A client's channel for forward and backward requests ('method' in each), answered in order."""
        peer = str(context.remote_id)
        channel = serve_channel(self.gate, self.passes.on_channel, requests, peer, self.config.session_timeout)
        async for response in self.gate.counted(peer, channel):
            yield response

    async def serve_inference(self, requests: Frames, context: P2PContext
                              ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A generation session: an 'open' message, then steps, each answered with the span's output."""
        peer = str(context.remote_id)
        async for response in self.gate.counted(peer, self.inference.serve(requests, peer)):
            yield response

    async def _one(self, handler, requests: Frames, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        peer = str(context.remote_id)
        one = serve_one(self.gate, handler, requests, peer, self.config.session_timeout)
        async for response in self.gate.counted(peer, one):
            yield response
