"""Strangers' requests that used to take a server out of service or corrupt another client's session,
each through the real RPC path: rejected opens keep no KV memory, and only a session's chain may push."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import threading
import time

import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarmtune import transport, wire
from swarmtune.client.config import ClientConfig
from swarmtune.client.connection import SwarmConnection
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.local_swarm import LocalSwarm
from swarmtune.transport import ServerFailure, ServerRejected
from tests.helpers import reference_model

HIDDEN = 64


def info(conn: SwarmConnection, peer_id: str, tries: int = 5) -> dict:
    """The server's info; a refusal for our own request rate (the tests' polls count toward it) is waited out."""
    for attempt in range(tries):
        try:
            meta, _ = conn.run(transport.call(conn.p2p, peer_id, "info", wire.pack({}), 10, token=conn.token),
                               timeout=15)
            return meta
        except transport.ServerRejected as e:
            if e.wait is None or attempt == tries - 1:
                raise
            time.sleep(max(e.wait, 0.2))


def open_session(conn: SwarmConnection, peer_id: str, meta: dict, tensors: dict | None = None
                 ) -> transport.MessageStream:
    """An inference stream whose 'open' was accepted (else raises the server's refusal)."""
    stream = transport.MessageStream(conn.p2p, peer_id, conn.token)
    try:
        conn.run(stream.exchange(wire.pack({"type": "open", **meta}, tensors), 20), timeout=30)
    except BaseException:
        conn.loop.call_soon_threadsafe(stream.close)
        raise
    return stream


def wait_until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_rejected_opens_keep_no_kv_memory(llama_swarm, llama_client):
    """Every kind of refused open, and an aborted one, leaves the server's KV budget as it found it."""
    conn, server = llama_client.connection, llama_swarm.servers[1]  # blocks 1:4
    wait_until(lambda: info(conn, server.peer_id)["active_sessions"] == 0, "earlier sessions did not close")
    free = info(conn, server.peer_id)["cache_bytes_free"]
    good = {"start": 1, "end": 4, "max_length": 64, "batch_size": 2}
    held = open_session(conn, server.peer_id, {**good, "session_id": "a" * 32})
    refused = [
        ({**good, "session_id": "short"}, None),                          # a malformed id
        ({**good, "session_id": "a" * 32}, None),                         # an id in use
        ({**good, "session_id": "b" * 32, "push_key": 7}, None),          # a malformed push key
        ({**good, "lora": {"keys": ["1.self_attn.q_proj"], "scale": 1.0, "digest": "never-sent"}}, None),
        ({**good, "max_length": 10**6}, None),                            # over the server's limit
        (good, {"deep_prompts": torch.zeros(2, 1, 2, HIDDEN)}),          # prompts for 2 of its 3 blocks
        ({**good, "batch_size": 64, "max_length": 8192}, None),           # more than the whole budget
    ]
    try:
        for meta, tensors in refused:
            with pytest.raises(ServerRejected) as raised:
                open_session(conn, server.peer_id, meta, tensors)
            assert not raised.value.retry, raised.value.reason
    finally:
        conn.loop.call_soon_threadsafe(held.close)
    wait_until(lambda: info(conn, server.peer_id)["cache_bytes_free"] == free,
               f"the KV budget did not come back to {free} bytes free")


def test_only_the_chain_may_push(llama_swarm, tiny_llama):
    """A third peer that knows a chained session's ids cannot write its inputs or end it; the servers' own
    pushes still arrive, and the victim's tokens are the local model's."""
    victim = SwarmForCausalLM.from_pretrained(
        tiny_llama, client_config=ClientConfig(initial_peers=llama_swarm.initial_peers, chaining=True))
    attacker = SwarmConnection(ClientConfig(initial_peers=llama_swarm.initial_peers), llama_swarm.dht_prefix, 6)
    prompt = torch.tensor([[1, 45, 67, 89, 12]])
    expected = reference_model(tiny_llama).generate(prompt, max_new_tokens=12, do_sample=False)
    try:
        with victim.inference_session(max_length=32) as session:
            first = victim.generate(prompt, max_new_tokens=4, do_sample=False)
            downstream = session.spans[1:]
            assert downstream and all(span.upstream for span in downstream)
            received = {s.hop.peer_id: info(attacker, s.hop.peer_id)["stats"].get("pushes_received", 0)
                        for s in downstream}
            for span in downstream:
                for step in range(session.steps, session.steps + 8):
                    forged = wire.pack({"session": span.session_id, "step": step},
                                       {"hidden": torch.full((1, 1, HIDDEN), 100.0)})
                    with pytest.raises(ServerRejected, match="push refused"):
                        attacker.run(transport.call(attacker.p2p, span.hop.peer_id, "push", forged, 10,
                                                    token=attacker.token), timeout=15)
            more = victim.generate(first, max_new_tokens=8, do_sample=False)
            for span in downstream:  # the chain's own pushes were taken
                stats = info(attacker, span.hop.peer_id)["stats"]
                assert stats.get("pushes_received", 0) >= received[span.hop.peer_id] + 8, stats
    finally:
        attacker.close()
        victim.close()
    assert torch.equal(more, expected)


def test_a_server_once_upstream_cannot_be_made_to_inject_into_a_session(llama_swarm, tiny_llama):
    """A third peer opens its own session on a chained session's upstream server and has it push, for the
    victim's session and coming steps, hidden states of its choosing: the downstream server refuses them (they
    lack the key the victim gave that hop), and the victim's tokens are the local model's."""
    victim = SwarmForCausalLM.from_pretrained(
        tiny_llama, client_config=ClientConfig(initial_peers=llama_swarm.initial_peers, chaining=True))
    attacker = SwarmConnection(ClientConfig(initial_peers=llama_swarm.initial_peers), llama_swarm.dht_prefix, 6)
    prompt = torch.tensor([[1, 45, 67, 89, 12]])
    expected = reference_model(tiny_llama).generate(prompt, max_new_tokens=8, do_sample=False)
    forger = None
    try:
        with victim.inference_session(max_length=32) as session:
            out = victim.generate(prompt, max_new_tokens=1, do_sample=False)
            assert len(session.spans) >= 2
            upstream, downstream = session.spans[-2], session.spans[-1]
            refused = info(attacker, downstream.hop.peer_id)["stats"].get("pushes_refused", 0)
            forger = open_session(attacker, upstream.hop.peer_id, {"start": upstream.hop.start, "end": upstream.hop.end,
                                                                  "max_length": 64, "batch_size": 1})
            for _ in range(7):
                for ahead in range(4):  # the victim's next steps, waiting in its mailbox before the real pushes
                    target = {"peer": downstream.hop.peer_id, "session": downstream.session_id, "key": "f" * 32}
                    forged = wire.pack({"step": session.steps + ahead, "push_to": target},
                                       {"hidden": torch.full((1, 1, HIDDEN), 100.0)})
                    attacker.run(forger.exchange(forged, 20), timeout=30)
                time.sleep(0.2)  # the forged pushes arrive
                out = victim.generate(out, max_new_tokens=1, do_sample=False)
            refused = info(attacker, downstream.hop.peer_id)["stats"].get("pushes_refused", 0) - refused
    finally:
        if forger is not None:
            attacker.loop.call_soon_threadsafe(forger.close)
        attacker.close()
        victim.close()
    assert torch.equal(out, expected)
    assert refused >= 28


def test_a_forged_push_for_an_unknown_session_is_refused(llama_swarm, llama_client):
    conn = llama_client.connection
    forged = wire.pack({"session": "c" * 32, "step": 0}, {"hidden": torch.zeros(1, 1, HIDDEN)})
    with pytest.raises(ServerFailure, match="unknown session"):
        conn.run(transport.call(conn.p2p, llama_swarm.servers[1].peer_id, "push", forged, 10, token=conn.token),
                 timeout=15)


def test_sessions_are_charged_for_their_prompts_and_adapter(llama_swarm, llama_client):
    """A session's deep prompts and client LoRA live as long as its cache: the budget counts them too."""
    conn, server = llama_client.connection, llama_swarm.servers[1]  # blocks 1:4, fp32
    wait_until(lambda: info(conn, server.peer_id)["active_sessions"] == 0, "earlier sessions did not close")
    free = info(conn, server.peer_id)["cache_bytes_free"]

    def charged(meta: dict, tensors: dict | None = None) -> int:
        stream = open_session(conn, server.peer_id, {"start": 1, "end": 4, "max_length": 64, "batch_size": 2, **meta},
                              tensors)
        try:
            return free - info(conn, server.peer_id)["cache_bytes_free"]
        finally:
            conn.loop.call_soon_threadsafe(stream.close)
            wait_until(lambda: info(conn, server.peer_id)["cache_bytes_free"] == free, "the session was not freed")

    cache_only = charged({})
    prompts = torch.zeros(3, 1, 8, HIDDEN)
    assert charged({}, {"deep_prompts": prompts}) - cache_only == prompts.numel() * 4
    lora = {"lora.A.0": torch.zeros(4, HIDDEN), "lora.B.0": torch.zeros(HIDDEN, 4)}
    assert charged({"lora": {"keys": ["1.self_attn.q_proj"], "scale": 1.0}}, lora) - cache_only == 2 * 4 * HIDDEN * 4


@pytest.fixture(scope="module")
def strict_swarm(tiny_llama):
    """One server for all blocks whose streams may stay idle for 3 s at most, forward graphs 2 s; one peer's
    requests may hold 4 MiB, all peers' 8 MiB; 1 MiB of KV memory, and sessions idle for 1 s may be evicted for
    another peer; 64 MiB of working memory for requests' activations."""
    with LocalSwarm(tiny_llama, spans=[(0, 6)], session_timeout=3, activation_cache_ttl=2, max_message_mb=4,
                    max_receiving_mb=8, cache_mb=1, evict_idle_after=1, working_memory_mb=64) as swarm:
        yield swarm


def connect(swarm: LocalSwarm) -> SwarmConnection:
    return SwarmConnection(ClientConfig(initial_peers=swarm.initial_peers), swarm.dht_prefix, 6)


@pytest.fixture(scope="module")
def strict_server(strict_swarm):
    conn = connect(strict_swarm)
    try:
        yield conn, strict_swarm.servers[0]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def another_peer(strict_swarm):
    conn = connect(strict_swarm)
    try:
        yield conn
    finally:
        conn.close()


@pytest.mark.parametrize("trickle", [False, True], ids=["idle", "trickling"])
def test_streams_that_never_finish_a_message_are_closed(strict_server, trickle):
    """A forward stream that sends nothing, or one 'more follows' frame a second, is answered and closed
    after the session timeout instead of being held open."""
    conn, server = strict_server
    trickling = asyncio.Event()

    async def call() -> dict:
        async def frames():
            while trickle and not trickling.is_set():
                yield runtime_pb2.ExpertRequest(uid=conn.token, metadata=b"\x01" + bytes(1024))
                await asyncio.sleep(1.0)
            await trickling.wait()

        responses = await conn.p2p.iterate_protobuf_handler(PeerID.from_base58(server.peer_id),
                                                            "BlockServicer.rpc_forward_stream", frames(),
                                                            runtime_pb2.ExpertResponse)
        reply = await asyncio.wait_for(responses.__anext__(), 30)
        return wire.unpack(wire.Reassembler().add(reply.metadata))[0]

    try:
        meta = conn.run(call(), timeout=40)
    finally:
        conn.loop.call_soon_threadsafe(trickling.set)
    assert "no whole message within 3 s" in meta["error"] and meta["retry"]


def test_kept_graphs_expire_without_further_requests(strict_server):
    """A forward that asks to keep its graph, and a backward that never comes: the memory is back after the
    graph's time, with no other request to push it out."""
    conn, server = strict_server
    data = wire.pack({"method": "forward", "start": 0, "end": 6, "keep": "never-backward"},
                     {"hidden": torch.randn(1, 16, HIDDEN)})
    conn.run(conn.channel(server.peer_id).request(data, 30), timeout=40)
    assert info(conn, server.peer_id)["graph_bytes_kept"] > 0
    wait_until(lambda: info(conn, server.peer_id)["graph_bytes_kept"] == 0, "the kept graph did not expire")


GRAPH_MEMORY = """
import gc, sys, psutil, torch
from swarmtune.models import load_span
from swarmtune.server import compute
span = load_span(sys.argv[1], 0, 6, torch.float32, "cpu", "sdpa")
hidden = torch.randn(1, int(sys.argv[2]), span.config.hidden_size)
gc.collect()
before = psutil.Process().memory_info().rss
graph = compute.forward_with_graph(span, hidden, None, None, None, None)
gc.collect()
print(graph.nbytes, psutil.Process().memory_info().rss - before)
"""


def test_a_kept_graph_is_counted_at_what_it_holds(tiny_llama):
    """What a graph is charged is what it keeps alive (a fresh process's memory growth), attention's
    quadratic share included: the per-token estimate it replaced was a quarter of it at 2,048 tokens."""
    out = subprocess.run([sys.executable, "-c", GRAPH_MEMORY, tiny_llama, "2048"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    charged, grown = (int(x) for x in out.stdout.split())
    assert 0.6 * grown <= charged <= 1.4 * grown, (charged, grown)


WORKING_MEMORY = """
import gc, sys, torch
from swarmtune.models import load_span
from swarmtune.server import compute, working_memory

def peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM"))

torch.set_num_threads(1)
span = load_span(sys.argv[1], 0, 6, torch.float32, "cpu", "sdpa")
hidden = torch.randn(1, int(sys.argv[3]), span.config.hidden_size)
compute.forward(span, hidden[:, :8], None, None, None, None)  # the runtime's own first-call allocations
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak starts again from what the process holds now
before = peak()
if sys.argv[2] == "forward":
    compute.forward(span, hidden, None, None, None, None)
else:
    compute.backward(span, hidden, None, None, None, None, torch.randn_like(hidden))
print(working_memory.estimate(span, sys.argv[2], 1, hidden.shape[1], hidden.shape[1]), peak() - before)
"""


@pytest.mark.parametrize("kind, length", [("forward", 4096), ("backward", 2048)])
def test_working_memory_estimates_bound_what_requests_hold(tiny_llama, kind, length):
    """What a request is charged bounds its peak memory (a fresh process's peak RSS, at lengths where it stands
    clear of the allocator's noise), without overstating it more than three times."""
    out = subprocess.run([sys.executable, "-c", WORKING_MEMORY, tiny_llama, kind, str(length)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    charged, peak = (int(x) for x in out.stdout.split())
    assert peak <= charged <= 3 * peak, (charged, peak)


def test_an_oversized_frame_is_refused_on_its_length_prefix(strict_server):
    """A frame that announces 600 MiB: the server hangs up after reading its 8-byte prefix, not after 600 MiB
    (nor at its session timeout), and goes on serving."""
    conn, server = strict_server

    async def send_prefix() -> float:
        _, reader, writer = await conn.p2p.call_binary_stream_handler(PeerID.from_base58(server.peer_id),
                                                                      "BlockServicer.rpc_forward_stream")
        began = time.monotonic()
        writer.write(P2P.MESSAGE_MARKER + (600 << 20).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + bytes(4096))
        await writer.drain()
        try:
            rest = await asyncio.wait_for(reader.read(), 10)  # at most an error reply, then the end of the stream
            assert rest == b"" or b"the stream ended before a whole message arrived" in rest, rest[:200]
        finally:
            writer.close()
        return time.monotonic() - began

    assert conn.run(send_prefix(), timeout=20) < 2.5  # the server's session timeout is 3 s
    assert info(conn, server.peer_id)["receiving_bytes"] == 0


async def partial_message(conn: SwarmConnection, peer_id: str, frames: int, release: asyncio.Event) -> None:
    """Sends `frames` 1 MiB 'more follows' frames on a forward stream, then waits for `release`; returns when
    the server answers (the stream's timeout, or a refusal) or the stream ends."""
    async def requests():
        for _ in range(frames):
            yield runtime_pb2.ExpertRequest(uid=conn.token, metadata=b"\x01" + bytes(1 << 20))
        await release.wait()

    responses = await conn.p2p.iterate_protobuf_handler(PeerID.from_base58(peer_id), "BlockServicer.rpc_forward_stream",
                                                        requests(), runtime_pb2.ExpertResponse)
    async with contextlib.aclosing(responses):
        with contextlib.suppress(StopAsyncIteration):
            await asyncio.wait_for(responses.__anext__(), 30)


@contextlib.contextmanager
def partial_messages(peer_id: str, *senders: tuple[SwarmConnection, int]):
    """Each (connection, n) sends n MiB of a message it never finishes, half a second apart. Yields the futures
    of `partial_message`; the streams end on exit."""
    released = {conn: asyncio.Event() for conn, _ in senders}
    streams = []
    try:
        for conn, frames in senders:
            streams.append(asyncio.run_coroutine_threadsafe(partial_message(conn, peer_id, frames, released[conn]),
                                                            conn.loop))
            time.sleep(0.5)
        yield streams
    finally:
        for conn, release in released.items():
            conn.loop.call_soon_threadsafe(release.set)


def forward_goes_through(conn: SwarmConnection, peer_id: str) -> None:
    data = wire.pack({"start": 0, "end": 6}, {"hidden": torch.randn(1, 4, HIDDEN)})
    _, tensors = conn.run(transport.call(conn.p2p, peer_id, "forward", data, 20), timeout=30)
    assert tensors["hidden"].shape == (1, 4, HIDDEN)


def test_large_messages_never_travel_as_unary_calls(strict_server):
    """A unary call over the small limit is refused, naming streams, before it is decoded; one over what the
    server's daemon takes never reaches the server; the client sends the same message as a stream, and it is
    served."""
    conn, server = strict_server
    message = wire.pack({"start": 0, "end": 6}, {"hidden": torch.randn(1, 512, HIDDEN)})  # 128 KiB

    async def unary(data: bytes, timeout: float) -> dict:
        reply = await asyncio.wait_for(conn.p2p.call_protobuf_handler(
            PeerID.from_base58(server.peer_id), "BlockServicer.rpc_forward",
            runtime_pb2.ExpertRequest(uid=conn.token, metadata=data), runtime_pb2.ExpertResponse), timeout)
        return wire.unpack(reply.metadata)[0]

    assert "send larger messages as a stream" in conn.run(unary(message, 20), timeout=30)["error"]
    before = info(conn, server.peer_id)["stats"]
    with pytest.raises(asyncio.TimeoutError):  # the daemon hangs up on its length prefix: no reply comes
        conn.run(unary(message + bytes(2 << 20), 3), timeout=10)
    after = info(conn, server.peer_id)["stats"]
    assert after.get("rejected", 0) == before.get("rejected", 0) and after.get("forward") == before.get("forward")
    _, tensors = conn.run(transport.call(conn.p2p, server.peer_id, "forward", message, 20), timeout=30)
    assert tensors["hidden"].shape == (1, 512, HIDDEN)


@pytest.mark.parametrize("method", ["forward", "backward"])
def test_a_request_whose_activations_exceed_the_working_memory_is_refused(strict_server, method):
    """1x4096 tokens need well over the server's 64 MiB of working memory (attention's [length x positions]
    masks alone are 128 MiB): refused before they run, as the client's error naming the longest request that
    fits, which then goes through; the budget holds nothing once they are answered."""
    conn, server = strict_server

    def send(length: int) -> dict:
        hidden = torch.randn(1, length, HIDDEN)
        tensors = {"hidden": hidden, "grad_output": torch.randn_like(hidden)} if method == "backward" else {}
        data = wire.pack({"start": 0, "end": 6}, {"hidden": hidden, **tensors})
        return conn.run(transport.call(conn.p2p, server.peer_id, method, data, 30, stream=True), timeout=40)[1]

    before = info(conn, server.peer_id)["stats"].get(method, 0)
    with pytest.raises(ServerRejected, match="working memory") as refused:
        send(4096)
    assert not refused.value.retry and info(conn, server.peer_id)["stats"].get(method, 0) == before
    longest = int(re.search(r"send at most 1x(\d+) tokens", refused.value.reason).group(1))
    assert 256 <= longest < 4096
    assert next(iter(send(longest).values())).shape == (1, longest, HIDDEN)
    after = info(conn, server.peer_id)
    assert after["working_bytes"] == 0 and after["working_bytes_max"] == 64 << 20
    assert after["stats"][method] == before + 1


def test_one_peer_cannot_buffer_more_than_one_message_across_streams(strict_server, another_peer):
    """Streams that never finish their message: the peer's second stream waits, unread and unanswered, while the
    two would hold more than one message's worth (4 MiB and its framing); another peer's forward goes through
    meanwhile; the bytes come back when the streams end."""
    (conn, server), other = strict_server, another_peer
    wait_until(lambda: info(conn, server.peer_id)["receiving_bytes"] == 0, "earlier streams held bytes")
    with partial_messages(server.peer_id, (conn, 3), (conn, 3)) as (_, second):
        time.sleep(0.5)
        assert 3 << 20 <= info(conn, server.peer_id)["receiving_bytes"] <= (4 << 20) * 17 // 16
        forward_goes_through(other, server.peer_id)
        time.sleep(1.5)  # a refusal would have come by now (held 1 s); the first stream's timeout not yet (3 s)
        assert not second.done()
    wait_until(lambda: info(conn, server.peer_id)["receiving_bytes"] == 0, "the streams' bytes were not released")


def test_flooders_leave_the_last_quarter_of_the_receive_budget_to_others(strict_server, another_peer, strict_swarm):
    """Two peers each holding a partial message: the one that would go past its share (half of the 8 MiB budget)
    while the budget is three-quarters full waits, unread, and a third peer is served meanwhile."""
    (conn, server), other = strict_server, another_peer
    wait_until(lambda: info(conn, server.peer_id)["receiving_bytes"] == 0, "earlier streams held bytes")
    third = connect(strict_swarm)
    try:
        with partial_messages(server.peer_id, (conn, 3), (other, 4)):
            time.sleep(0.5)
            assert info(conn, server.peer_id)["receiving_bytes"] < 6.1 * (1 << 20)  # the 4th MiB was not read
            forward_goes_through(third, server.peer_id)
    finally:
        third.close()
    wait_until(lambda: info(conn, server.peer_id)["receiving_bytes"] == 0, "the streams' bytes were not released")


def test_idle_sessions_of_a_peer_over_its_share_make_room_for_another(strict_server, another_peer):
    """A peer holding most of the KV memory in an idle session: another peer's open is served by evicting it
    (within the wait for memory), the evicted session's next step is refused with retry, and the memory of
    both comes back."""
    (conn, server), legit = strict_server, another_peer
    wait_until(lambda: info(conn, server.peer_id)["active_sessions"] == 0, "earlier sessions did not close")
    free = info(conn, server.peer_id)["cache_bytes_free"]
    probe = open_session(conn, server.peer_id, {"start": 0, "end": 6, "max_length": 100, "batch_size": 1})
    per_token = (free - info(conn, server.peer_id)["cache_bytes_free"]) / 100
    conn.loop.call_soon_threadsafe(probe.close)
    wait_until(lambda: info(conn, server.peer_id)["cache_bytes_free"] == free, "the probe was not freed")
    hog = open_session(conn, server.peer_id, {"start": 0, "end": 6, "max_length": int(0.7 * free / per_token),
                                              "batch_size": 1, "session_id": "h" * 32})
    try:
        began = time.monotonic()
        mine = open_session(legit, server.peer_id, {"start": 0, "end": 6, "max_length": int(0.5 * free / per_token),
                                                    "batch_size": 1})
        assert time.monotonic() - began < 8  # the open waits (10 s at most) until the hog's session is evictable
        step = wire.pack({"type": "step", "step": 0}, {"hidden": torch.randn(1, 2, HIDDEN)})
        with pytest.raises(ServerRejected, match="evicted") as raised:  # before the hog's stream times out (3 s)
            conn.run(hog.exchange(step, 20), timeout=30)
        assert raised.value.retry
        _, out = legit.run(mine.exchange(step, 20), timeout=30)
        assert out["hidden"].shape == (1, 2, HIDDEN)
        assert info(conn, server.peer_id)["evictions"] >= 1
        legit.loop.call_soon_threadsafe(mine.close)
    finally:
        conn.loop.call_soon_threadsafe(hog.close)
    wait_until(lambda: info(conn, server.peer_id)["cache_bytes_free"] == free, "the KV budget did not come back")


def test_a_peer_over_its_share_loses_its_oldest_active_session_to_a_waiting_one(strict_server, another_peer):
    """A peer holding most of the KV memory in two sessions it keeps stepping (never idle long enough to be
    evicted as idle): another peer's open is served by evicting the hog's oldest session, whose next step is
    refused with retry, naming the eviction; the memory comes back."""
    (conn, server), legit = strict_server, another_peer
    wait_until(lambda: info(conn, server.peer_id)["active_sessions"] == 0, "earlier sessions did not close")
    free = info(conn, server.peer_id)["cache_bytes_free"]
    time.sleep(1.1)  # the opens of earlier tests counted toward this peer's rate (a second's worth at most)
    probe = open_session(conn, server.peer_id, {"start": 0, "end": 6, "max_length": 100, "batch_size": 1})
    per_token = (free - info(conn, server.peer_id)["cache_bytes_free"]) / 100
    conn.loop.call_soon_threadsafe(probe.close)
    wait_until(lambda: info(conn, server.peer_id)["cache_bytes_free"] == free, "the probe was not freed")
    hog_meta = {"start": 0, "end": 6, "batch_size": 1, "max_length": int(0.45 * free / per_token)}
    time.sleep(1.1)  # each open counts toward the rate by its reservation (almost half a second's worth)
    hogs = [open_session(conn, server.peer_id, hog_meta)]
    stop, refusals = threading.Event(), []
    step = wire.pack({"type": "step", "step": 0}, {"hidden": torch.randn(1, 1, HIDDEN)})

    def keep_stepping() -> None:  # from the first open on: a hog idle for the session timeout (3 s) is closed
        while not stop.wait(0.3):
            for hog in list(hogs):
                if not hog.closed:
                    try:
                        conn.run(hog.exchange(step, 20), timeout=30)
                    except ServerFailure as e:
                        refusals.append(e)

    stepping = threading.Thread(target=keep_stepping, daemon=True)
    stepping.start()
    try:
        time.sleep(1.1)
        hogs.append(open_session(conn, server.peer_id, hog_meta))
        time.sleep(1.0)
        began = time.monotonic()
        mine = open_session(legit, server.peer_id, {"start": 0, "end": 6, "max_length": int(0.4 * free / per_token),
                                                    "batch_size": 1})
        assert time.monotonic() - began < 8  # not the whole wait for memory (10 s)
        _, out = legit.run(mine.exchange(step, 20), timeout=30)
        assert out["hidden"].shape == (1, 1, HIDDEN)
        wait_until(lambda: refusals, "the evicted session's step was not refused")
        assert info(conn, server.peer_id)["evictions"] >= 1
        assert all(isinstance(e, ServerRejected) and "evicted" in e.reason and e.retry for e in refusals), refusals
        assert hogs[0].closed and not hogs[1].closed  # the oldest went; the newer one goes on
        legit.loop.call_soon_threadsafe(mine.close)
    finally:
        stop.set()
        stepping.join(timeout=30)
        for hog in hogs:
            conn.loop.call_soon_threadsafe(hog.close)
    wait_until(lambda: info(conn, server.peer_id)["cache_bytes_free"] == free, "the KV budget did not come back")


def test_a_session_closed_for_idling_says_so_to_a_step_sent_after(strict_server):
    """The server closes a session idle past its timeout (3 s); a step the client sends a moment later gets
    that reason, not a broken stream (closing at once made the daemon drop the reply)."""
    conn, server = strict_server
    stream = open_session(conn, server.peer_id, {"start": 0, "end": 6, "max_length": 8, "batch_size": 1})
    time.sleep(3.5)
    step = wire.pack({"type": "step", "step": 0}, {"hidden": torch.randn(1, 1, HIDDEN)})
    with pytest.raises(ServerRejected, match="session idle for more than 3 s"):
        conn.run(stream.exchange(step, 20), timeout=30)


def test_a_kept_graph_with_lora_is_not_charged_for_the_frozen_weights(tiny_llama):
    """Its LoRA tensors join the graph's inputs; the frozen weights that autograd also saves are the server's own
    and were once counted as if the graph held a copy of them."""
    from swarmtune.models import load_span
    from swarmtune.server import compute
    from swarmtune.server.lora import LoraSet, wrap_targets

    span = load_span(tiny_llama, 0, 6, torch.float32, "cpu", "sdpa")
    wrap_targets(span.blocks, 0, ("self_attn.q_proj", "mlp.down_proj"))
    hidden = torch.randn(1, 16, HIDDEN)
    plain = compute.forward_with_graph(span, hidden, None, None, None, None).nbytes
    mlp = span.config.intermediate_size
    lora = LoraSet({"0.self_attn.q_proj": (torch.zeros(4, HIDDEN), torch.zeros(HIDDEN, 4)),
                    "0.mlp.down_proj": (torch.zeros(4, mlp), torch.zeros(HIDDEN, 4))}, 1.0)
    with_lora = compute.forward_with_graph(span, hidden, None, None, None, lora).nbytes
    weights = sum(p.numel() * p.element_size() for p in span.parameters())
    assert plain < with_lora < plain + weights / 4, (plain, with_lora, weights)
