"""Streaming RPCs served without read-ahead: a stream's next frame is read only when its handler asks for it.

hivemind's own stream handler reads up to six frames ahead of the handler, for every open stream,
before anything could charge them to a peer: a few hundred streams that never finish a message
then hold gigabytes that no budget sees. Read on demand, a stream holds at most the frame its
handler is taking, and a peer that sends faster than it is served is held back by the transport's
flow control. The frames on the wire are hivemind's, so clients call these RPCs as any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from hivemind.p2p import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

logger = logging.getLogger(__name__)

StreamHandler = Callable[[AsyncIterator[runtime_pb2.ExpertRequest], P2PContext],
                         AsyncIterator[runtime_pb2.ExpertResponse]]


async def serve_on_demand(p2p: P2P, name: str, handler: StreamHandler) -> None:
    """Serve the streaming RPC `name` with `handler`, replacing whatever handled it before."""
    async def handle(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=info.peer_id)
        responses = handler(_requests(reader), context)
        with contextlib.closing(writer):
            try:
                async for response in responses:
                    await P2P.send_protobuf(response, writer)
            except (ConnectionError, asyncio.IncompleteReadError) as e:  # the caller hung up
                logger.debug(f"stream {name} from {info.peer_id} ended: {e!r}")
            finally:
                await responses.aclose()

    with contextlib.suppress(Exception):  # nothing registered yet
        await p2p.remove_binary_stream_handler(name)
    await p2p.add_binary_stream_handler(name, handle)


async def _requests(reader: asyncio.StreamReader) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    """The caller's frames, each read when asked for; ends at the caller's end of stream or hang-up."""
    while True:
        try:
            request, _ = await P2P.receive_protobuf(runtime_pb2.ExpertRequest, reader)
        except asyncio.IncompleteReadError:  # a hang-up, or a frame over the bound (swarmtune.p2p)
            return
        if request is None:  # hivemind's end-of-stream marker
            return
        yield request
