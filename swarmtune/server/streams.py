"""Streaming RPCs served without read-ahead: a stream's next frame is read only when its handler asks for it.

hivemind's own stream handler reads up to six frames ahead of the handler, for every open stream,
before anything could charge them to a peer: a few hundred streams that never finish a message
then hold gigabytes that no budget sees. Read on demand, a stream holds at most the frame its
handler is taking (charged to its peer before it is read), and a peer that sends faster than it is
served is held back by the transport's flow control. The frames on the wire are hivemind's, so
clients call these RPCs as any other. Also here: reading a whole message of a stream, frame by frame as
its peer's budget allows, and answering it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from hivemind.p2p import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

from swarmtune import wire
from swarmtune.server.receiving import Intake

logger = logging.getLogger(__name__)
MAX_FRAME_BYTES = wire.CHUNK_BYTES + (64 << 10)  # swarmtune's own frames, with room for their framing

StreamHandler = Callable[["Frames", P2PContext], AsyncIterator[runtime_pb2.ExpertResponse]]


async def serve_on_demand(p2p: P2P, name: str, handler: StreamHandler) -> None:
    """Serve the streaming RPC `name` with `handler`, replacing whatever handled it before."""
    async def handle(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=info.peer_id)
        responses = handler(Frames(reader), context)
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


class Frames:
    """The caller's frames, each read when asked for. `next` learns a frame's length from its prefix and lets
    the caller charge it before a byte of it is read."""

    def __init__(self, reader: asyncio.StreamReader):
        self._reader = reader

    @property
    def hung_up(self) -> bool:
        """The caller closed its end and every frame it sent has been read: nothing more will come."""
        return self._reader.at_eof()

    async def next(self, reserve: Callable[[int], Awaitable[None]] | None = None
                   ) -> runtime_pb2.ExpertRequest | None:
        """The next frame; None at the caller's end of stream or hang-up (or a frame over swarmtune.p2p's
        bound). `await reserve(nbytes)` may wait before the frame is read, or raise to refuse it, which is
        then skipped, never held."""
        try:
            marker = await self._reader.readexactly(1)
            length = int.from_bytes(await self._reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
            if length > MAX_FRAME_BYTES:
                return None
            try:
                if reserve is not None:
                    await reserve(length)
            except Exception:  # refused: skip its bytes in small pieces, so the stream stays in step
                for offset in range(0, length, 64 << 10):
                    await self._reader.readexactly(min(64 << 10, length - offset))
                raise
            data = await self._reader.readexactly(length)
        except asyncio.IncompleteReadError:
            return None
        if marker != P2P.MESSAGE_MARKER:  # hivemind's end-of-stream marker (an error frame)
            return None
        request = runtime_pb2.ExpertRequest()
        request.ParseFromString(data)
        return request

    def __aiter__(self) -> Frames:
        return self

    async def __anext__(self) -> runtime_pb2.ExpertRequest:
        request = await self.next()
        if request is None:
            raise StopAsyncIteration
        return request


async def read_message(frames: Frames, reassembler: wire.Reassembler, admission: Callable[[str], None],
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


async def drain(frames: Frames, timeout: float = 2.0, max_frames: int = 8) -> None:
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


def frame(message: bytes) -> runtime_pb2.ExpertResponse:
    """A short message (a status or an error) as one stream frame."""
    return runtime_pb2.ExpertResponse(metadata=wire.frames(message)[0])


def replies(message: bytes) -> list[runtime_pb2.ExpertResponse]:
    """A message of any size as stream frames."""
    return [runtime_pb2.ExpertResponse(metadata=f) for f in wire.frames(message)]
