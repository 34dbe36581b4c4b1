"""Hundreds of malformed requests of every RPC type: each gets an error reply and the server keeps serving."""

from __future__ import annotations

import asyncio
import gc
import os

import msgpack
import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmtune import transport, wire
from swarmtune.transport import MessageStream, ServerRejected

HIDDEN = 64  # the tiny llama's hidden size; every structured request below gets something else wrong
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                    max_size=3), max_leaves=8)
dtypes = st.sampled_from(list(wire.DTYPES.values()))
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@st.composite
def bad_span_requests(draw) -> bytes:
    """A decodable message with a flaw: wrong hidden size, bad dtype, bad blocks, bad extras, or junk."""
    meta = draw(st.dictionaries(st.sampled_from(["start", "end", "lora", "type", "step", "junk"]), values))
    tensors = {}
    if draw(st.booleans()):
        width = draw(st.integers(1, 80).filter(lambda h: h != HIDDEN))
        shape = [draw(st.integers(1, 3)), draw(st.integers(1, 4)), width]
        tensors["hidden"] = torch.zeros(shape, dtype=draw(dtypes))
    for name in draw(st.lists(st.sampled_from(["attention_mask", "position_ids", "deep_prompts", "grad_output",
                                                "lora.A.0", "lora.B.0", "reorder", "x"]), max_size=3)):
        tensors[name] = torch.zeros(draw(shapes), dtype=draw(dtypes))
    return wire.pack(meta, tensors)


@st.composite
def corrupt_messages(draw) -> bytes:
    """Bytes that do not decode: random, truncated, or a header that lies about its tensors."""
    kind = draw(st.sampled_from(["random", "truncated", "lying"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "truncated":
        good = wire.pack({"start": 0, "end": 1}, {"hidden": torch.zeros(1, 2, HIDDEN)})
        return good[:draw(st.integers(0, len(good) - 1))]
    header = msgpack.packb({"meta": {"start": 0, "end": 1},
                            "tensors": [[draw(st.text(max_size=5)), draw(st.text(max_size=8)), draw(shapes)]]})
    return len(header).to_bytes(4, "little") + header + draw(st.binary(max_size=64))


messages = bad_span_requests() | corrupt_messages()


@pytest.fixture(scope="module")
def target(llama_swarm, llama_client):
    return llama_client.connection, llama_swarm.servers[0]


def _call(conn, peer_id: str, method: str, data: bytes, stream: bool = False):
    return conn.run(transport.call(conn.p2p, peer_id, method, data, 20, stream=stream, token=conn.token), timeout=30)


@pytest.mark.parametrize("method,stream", [("forward", False), ("backward", False), ("forward", True),
                                           ("backward", True)])
def test_span_rpcs_refuse_garbage(target, method, stream):
    conn, server = target

    @FUZZ
    @given(data=messages)
    def check(data):
        with pytest.raises(ServerRejected) as raised:
            _call(conn, server.peer_id, method, data, stream)
        assert not raised.value.retry, raised.value.reason  # the client's fault, never the server's

    check()
    _assert_still_serving(conn, server)


def test_inference_sessions_refuse_garbage(target):
    conn, server = target

    def exchange(messages: list[bytes]):
        stream = MessageStream(conn.p2p, server.peer_id, conn.token)
        try:
            for data in messages:
                conn.run(stream.exchange(data, 20), timeout=30)
        finally:
            conn.loop.call_soon_threadsafe(stream.close)

    opening = wire.pack({"type": "open", "start": 0, "end": 1, "max_length": 16, "batch_size": 1})

    @FUZZ
    @given(data=messages, after_open=st.booleans())
    def check(data, after_open):
        with pytest.raises(ServerRejected) as raised:  # an error reply, which closes the stream on our side
            exchange([opening, data] if after_open else [data])
        assert not raised.value.retry, raised.value.reason

    check()
    _assert_still_serving(conn, server)


def test_refused_streams_leave_no_sockets_behind(target):
    """Streams that end in an error reply close their sockets (and libp2p streams) at once, not when a full
    garbage collection finds them: a long run would otherwise pile up thousands, until the process runs out of
    file descriptors and the daemon of streams."""
    conn, server = target
    bad = wire.pack({"type": "nonsense"}, {"hidden": torch.zeros(1, 2, HIDDEN + 1)})

    def refused_inference_stream():
        stream = MessageStream(conn.p2p, server.peer_id, conn.token)
        try:
            with pytest.raises(ServerRejected):
                conn.run(stream.exchange(bad, 20), timeout=30)
        finally:
            conn.loop.call_soon_threadsafe(stream.close)

    def refused_forward_stream():
        with pytest.raises(ServerRejected):
            _call(conn, server.peer_id, "forward", bad, stream=True)

    def open_sockets() -> int:
        return len(os.listdir("/proc/self/fd"))

    gc.disable()
    try:
        before = open_sockets()
        for _ in range(100):
            refused_inference_stream()
            refused_forward_stream()
        conn.run(asyncio.sleep(0.5), timeout=5)  # the closes are scheduled on the connection's loop
        assert open_sockets() - before < 20
    finally:
        gc.enable()


def test_a_streamed_error_reply_waits_for_the_clients_hang_up(target):
    """The server keeps its end of a refused stream open until the client hangs up: closing first makes the
    daemon reset the stream, and the reset drops the reply wherever the client's daemon has not read it yet
    (a lost reply, about once in 30,000 calls on a busy machine)."""
    conn, server = target
    bad = wire.pack({"start": 0, "end": 1}, {"hidden": torch.zeros(1, 2, HIDDEN + 1)})

    async def exchange() -> bool:
        _, reader, writer = await conn.p2p.call_binary_stream_handler(
            PeerID.from_base58(server.peer_id), f"{transport.SERVICE}.rpc_forward_stream")
        try:
            for frame in wire.frames(bad):
                await P2P.send_protobuf(runtime_pb2.ExpertRequest(uid=conn.token, metadata=frame), writer)
            await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
            reply, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
            assert error is None and "error" in wire.unpack(wire.Reassembler().add(reply.metadata))[0]
            try:
                await asyncio.wait_for(reader.read(1), 0.5)
            except asyncio.TimeoutError:
                return True  # nothing more came, and the server's end is still open
            return False  # the server closed its end (or sent more)
        finally:
            writer.close()

    assert conn.run(exchange(), timeout=30)


def _assert_still_serving(conn, server) -> None:
    assert server.proc.poll() is None
    _, reply = _call(conn, server.peer_id, "forward", wire.pack({"start": 0, "end": 1},
                                                                 {"hidden": torch.randn(1, 3, HIDDEN)}))
    assert reply["hidden"].shape == (1, 3, HIDDEN)


@pytest.mark.parametrize("edit", [
    ({"truncate": -1}, {}), ({"truncate": 9}, {}), ({"truncate": "2"}, {}), ({"truncate": 2.0}, {}),
    ({}, {"keep": torch.tensor([1])}),                                   # keep without truncate
    ({"truncate": 2}, {"keep": torch.tensor([1, 1])}),                   # a row too many
    ({"truncate": 2}, {"keep": torch.tensor([3])}),                      # beyond truncate
    ({"truncate": 2}, {"keep": torch.tensor([1.0])}),                    # not integers
])
def test_bad_rollbacks_are_the_clients_error(target, edit):
    """A step whose cache edits (speculative decoding's rollback) are out of range or mistyped is refused
    without retry, and the server keeps serving."""
    conn, server = target
    meta, tensors = edit
    one = torch.ones(1, 3, dtype=torch.long)
    first = {"hidden": torch.randn(1, 3, HIDDEN), "attention_mask": one, "position_ids": torch.arange(3)[None]}
    bad = {"hidden": torch.randn(1, 1, HIDDEN), "attention_mask": one[:, :1], "position_ids": torch.tensor([[2]]),
           **tensors}
    stream = MessageStream(conn.p2p, server.peer_id, conn.token)
    try:
        conn.run(stream.exchange(wire.pack({"type": "open", "start": 0, "end": 1, "max_length": 16,
                                            "batch_size": 1}), 20), timeout=30)
        conn.run(stream.exchange(wire.pack({"step": 0}, first), 20), timeout=30)
        with pytest.raises(ServerRejected) as raised:
            conn.run(stream.exchange(wire.pack({"step": 1, **meta}, bad), 20), timeout=30)
        assert not raised.value.retry, raised.value.reason
        assert any(word in str(raised.value) for word in ("truncate", "keep")), raised.value
    finally:
        conn.loop.call_soon_threadsafe(stream.close)
    _assert_still_serving(conn, server)
