"""Calling a server over hivemind's P2P: request/response RPCs and message streams, with every failure
as one exception type, ServerFailure. Clients use it, and so do servers when they pass an inference
step on to the next server of a chain."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarmtune import wire

SERVICE = "BlockServicer"
# The largest message sent as a unary call; larger ones go as a stream. A daemon reads a unary call whole
# before its server sees it, so servers refuse larger ones, and their daemons anything past SERVER_UNARY_BYTES.
UNARY_BYTES = 64 << 10
SERVER_UNARY_BYTES = 1 << 20  # also bounds the DHT's messages through a server's daemon
PROBE_PERIOD = 1.0   # seconds without a reply after which a stream checks that its server is still there
PROBE_TIMEOUT = 10.0  # a server that does not answer an info call within this is taken for dead


class ServerFailure(RuntimeError):
    """A server did not deliver: unreachable, too slow, an error reply, or a bad result."""

    def __init__(self, peer_id: str, reason: str):
        self.peer_id, self.reason = peer_id, reason
        super().__init__(f"server {peer_id} failed: {reason}")


class ServerRejected(ServerFailure):
    """The server answered with an error reply; `retry` says whether another server (or later) may succeed, `wait`
    (refusals for the caller's own request rate) after how many seconds this server would take it."""

    def __init__(self, peer_id: str, reason: str, retry: bool = True, wait: float | None = None):
        super().__init__(peer_id, reason)
        self.retry, self.wait = retry, wait


def _handle(method: str) -> str:
    return f"{SERVICE}.rpc_{method}"


def _decode(peer_id: str, data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        meta, tensors = wire.unpack(data)
    except wire.WireError as e:
        raise ServerFailure(peer_id, f"unreadable reply: {e}") from None
    if "error" in meta:
        wait = meta.get("wait")
        raise ServerRejected(peer_id, str(meta["error"]), bool(meta.get("retry", True)),
                             float(wait) if isinstance(wait, (int, float)) and wait >= 0 else None)
    return meta, tensors


async def call(p2p: P2P, peer_id: str, method: str, data: bytes, timeout: float,
               stream: bool = False, token: str = "") -> tuple[dict, dict]:
    """Send one message to `method` (forward, backward, info) and decode the reply.

    Messages up to UNARY_BYTES go as a unary RPC; larger ones, or ones whose reply may be large
    (`stream=True`), go through the streaming variant in frames.
    """
    peer = PeerID.from_base58(peer_id)
    try:
        if stream or len(data) > UNARY_BYTES:
            reply = await asyncio.wait_for(_call_stream(p2p, peer, method + "_stream", data, token), timeout)
        else:
            request = runtime_pb2.ExpertRequest(uid=token, metadata=data)
            response = await asyncio.wait_for(p2p.call_protobuf_handler(
                peer, _handle(method), request, runtime_pb2.ExpertResponse), timeout)
            reply = response.metadata
    except asyncio.TimeoutError:
        raise ServerFailure(peer_id, f"timeout after {timeout:g} s") from None
    except asyncio.CancelledError:
        raise
    except Exception as e:
        raise ServerFailure(peer_id, f"{type(e).__name__}: {e}") from None
    return _decode(peer_id, reply)


async def _call_stream(p2p: P2P, peer: PeerID, method: str, data: bytes, token: str) -> bytes:
    async def requests():
        for frame in wire.frames(data):
            yield runtime_pb2.ExpertRequest(uid=token, metadata=frame)

    responses = await p2p.iterate_protobuf_handler(peer, _handle(method), requests(), runtime_pb2.ExpertResponse)
    reassembler = wire.Reassembler()
    async with contextlib.aclosing(responses):  # the stream's socket closes now, not when a GC finds it
        async for response in responses:
            message = reassembler.add(response.metadata)
            if message is not None:
                return message
    raise ConnectionError("the stream closed before the reply was complete")


class MessageStream:
    """One open streaming RPC (`inference` sessions, `spans` channels): messages go out in order and
    replies come back in order.

    `send` only queues a message, so a client can address several servers before awaiting any
    reply; `exchange` is the two together. Any failure closes the stream and raises ServerFailure.
    """

    def __init__(self, p2p: P2P, peer_id: str, token: str = "", method: str = "inference"):
        self.p2p, self.peer_id, self.token, self.method = p2p, peer_id, token, method
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._responses: AsyncIterator | None = None
        self._reassembler = wire.Reassembler()
        self.closed = False
        self.sent_ns = self.received_ns = 0  # when the last frame went to the daemon, the last reply came whole

    async def _requests(self):
        while True:
            frame = await self._outbox.get()
            if frame is None:
                return
            self.sent_ns = time.perf_counter_ns()
            yield runtime_pb2.ExpertRequest(uid=self.token, metadata=frame)

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise ServerFailure(self.peer_id, "the session stream is closed")
        for frame in wire.frames(data):
            self._outbox.put_nowait(frame)
        if self._responses is None:
            try:
                self._responses = await self.p2p.iterate_protobuf_handler(
                    PeerID.from_base58(self.peer_id), _handle(self.method), self._requests(),
                    runtime_pb2.ExpertResponse)
            except Exception as e:
                self.close()
                raise ServerFailure(self.peer_id, f"{type(e).__name__}: {e}") from None

    async def receive(self, timeout: float) -> tuple[dict, dict]:
        """The next reply."""
        try:
            return await asyncio.wait_for(self._receive_while_alive(), timeout)
        except ServerFailure:
            self.close()
            raise
        except asyncio.TimeoutError:
            self.close()
            raise ServerFailure(self.peer_id, f"timeout after {timeout:g} s") from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.close()
            raise ServerFailure(self.peer_id, f"{type(e).__name__}: {e}") from None

    async def _receive_while_alive(self) -> tuple[dict, dict]:
        """Await the reply, checking now and then that the server still answers at all.

        The daemon does not report a stream whose server died (machine gone, process killed):
        without these probes a request in flight would only fail at its timeout.
        """
        reply, probe = asyncio.ensure_future(self._receive()), None
        try:
            while True:
                done, _ = await asyncio.wait({reply}, timeout=PROBE_PERIOD)
                if done:
                    return reply.result()
                probe = asyncio.ensure_future(self._probe())
                done, _ = await asyncio.wait({reply, probe}, return_when=asyncio.FIRST_COMPLETED)
                if reply in done:
                    return reply.result()
                probe.result()  # raises ServerFailure if the server is unreachable or mute
        finally:
            for task in (reply, probe):
                if task is not None and not task.done():
                    task.cancel()

    async def _probe(self) -> None:
        with contextlib.suppress(ServerRejected):  # a refusal is an answer: the server is alive
            await call(self.p2p, self.peer_id, "info", wire.pack({}), PROBE_TIMEOUT, token=self.token)

    async def _receive(self) -> tuple[dict, dict]:
        if self._responses is None:
            raise ConnectionError("nothing was sent on this stream")
        async for response in self._responses:
            message = self._reassembler.add(response.metadata)
            if message is not None:
                self.received_ns = time.perf_counter_ns()
                return _decode(self.peer_id, message)
        raise ConnectionError("the server closed the session")

    async def exchange(self, data: bytes, timeout: float) -> tuple[dict, dict]:
        """Send one message and wait for its reply."""
        await self.send(data)
        return await self.receive(timeout)

    def close(self) -> None:
        """End the stream (on the connection's loop): our end-of-stream goes out, then the stream's socket
        to the daemon is closed. Left to the garbage collector, every stream that ended in an error would
        hold a socket and a libp2p stream until a full collection: thousands of them in a long run."""
        if not self.closed:
            self.closed = True
            self._outbox.put_nowait(None)
            if self._responses is not None:
                asyncio.ensure_future(_close_responses(self._responses))


async def _close_responses(responses: AsyncGenerator) -> None:
    """Close a stream's replies, unless a receive is still reading them (its cancellation closes them)."""
    if not responses.ag_running:
        await responses.aclose()


class Channel:
    """A long-lived `spans` stream to one server for forward and backward requests, one at a time."""

    IDLE = 30.0  # reopened after this long unused (servers close channels idle past their session timeout)

    def __init__(self, p2p: P2P, peer_id: str, token: str = ""):
        self.p2p, self.peer_id, self.token = p2p, peer_id, token
        self.stream: MessageStream | None = None
        self.used = 0.0
        self._lock = asyncio.Lock()

    async def request(self, data: bytes, timeout: float) -> tuple[dict, dict]:
        async with self._lock:
            if self.stream is None or self.stream.closed or time.monotonic() - self.used > self.IDLE:
                if self.stream is not None:
                    self.stream.close()
                self.stream = MessageStream(self.p2p, self.peer_id, self.token, "spans")
            self.used = time.monotonic()
            return await self.stream.exchange(data, timeout)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
