"""Hostile clients for benchmarks/hostile.py: each runs as its own process, one libp2p peer on 127.0.0.1.

    python -m benchmarks.attackers KIND (--server MADDR | --go-file PATH) --duration S [--workers N] ...

It connects to the one server it attacks (no DHT): --server, or the address written to --go-file
(it waits for that file, so that it can boot while the server starts). It prints READY once the
attack is under way (the KV hog: once it holds the budget), a line `STATS {json}` every second,
and stops by itself after --duration seconds. The benchmark also kills it, with its libp2p daemon, by PID. Every loop is
bounded by the deadline and every network wait by a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgpack
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarmtune import transport, wire
from swarmtune.p2p import NetworkOptions, start_p2p, stop_p2p

CALL_TIMEOUT = 10.0
GO_TIMEOUT = 120.0   # the benchmark creates the go file well within this, or has given up on us


@dataclass
class Attack:
    """What every attack needs: the server, its peer, the deadline and the counters it reports."""

    p2p: P2P
    peer_id: str
    args: argparse.Namespace
    deadline: float
    stats: Counter = field(default_factory=Counter)
    replies: Counter = field(default_factory=Counter)   # the server's answers, by their first words
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def peer(self) -> PeerID:
        return PeerID.from_base58(self.peer_id)

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def answered(self, what: str) -> None:
        self.replies[re.sub(r"\d+", "N", " ".join(what.split()[:6]))[:60]] += 1

    async def call(self, method: str, data: bytes) -> None:
        """One unary RPC; a refusal or failure is counted, not raised (that is what attackers get)."""
        self.stats["sent"] += 1
        try:
            await transport.call(self.p2p, self.peer_id, method, data, min(CALL_TIMEOUT, self.left() + 1))
            self.answered("ok")
        except transport.ServerFailure as e:
            self.answered(e.reason)

    async def stream(self, method: str, frames: AsyncIterator[runtime_pb2.ExpertRequest]) -> None:
        """Open a stream that sends `frames`; wait for the server's first reply (or the deadline), then close."""
        self.stats["streams"] += 1
        try:
            responses = await asyncio.wait_for(self.p2p.iterate_protobuf_handler(
                self.peer, f"{transport.SERVICE}.rpc_{method}", frames, runtime_pb2.ExpertResponse), CALL_TIMEOUT)
            async with contextlib.aclosing(responses):
                reply = await asyncio.wait_for(responses.__anext__(), self.left() + 0.1)
            meta, _ = wire.unpack(wire.Reassembler().add(reply.metadata) or b"")
            self.answered(str(meta.get("error", "ok")))
        except asyncio.TimeoutError:
            self.stats["streams_open_at_deadline"] += 1
        except (StopAsyncIteration, wire.WireError):
            self.answered("stream closed")
        except Exception as e:  # the daemon resets streams the server gave up on
            self.answered(type(e).__name__)


async def until(condition: Callable[[], bool], deadline: float, period: float = 0.05) -> None:
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(period)


async def workers(attack: Attack, n: int, loop: Callable[[Attack, int], Awaitable[None]]) -> None:
    """`n` copies of `loop`, marked ready at once (most attacks are under way as soon as they start)."""
    attack.ready.set()
    await asyncio.gather(*(loop(attack, i) for i in range(n)))


# ---- 1. pre-admission flood: 1 MiB "more follows" frames, never the last one -------------------------


async def flood(attack: Attack) -> None:
    await workers(attack, attack.args.workers, _flood_stream)


async def _flood_stream(attack: Attack, _: int) -> None:
    frame = runtime_pb2.ExpertRequest(metadata=b"\x01" + bytes(wire.CHUNK_BYTES))
    while attack.running():
        stop = asyncio.Event()
        try:
            await attack.stream("forward_stream", _flood_frames(attack, frame, stop))
        finally:
            stop.set()
        await asyncio.sleep(0.01)


async def _flood_frames(attack: Attack, frame: runtime_pb2.ExpertRequest, stop: asyncio.Event
                        ) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    """As many 'more follows' frames as the stream takes, until the server answers; never the last frame."""
    while attack.running() and not stop.is_set():
        attack.stats["frames"] += 1
        yield frame
    await until(stop.is_set, attack.deadline)


# ---- 2. slow and idle streams ------------------------------------------------------------------------


async def idle(attack: Attack) -> None:
    """Inference streams that never send their 'open'."""
    await workers(attack, attack.args.workers, _idle_stream)


async def _idle_stream(attack: Attack, i: int) -> None:
    await asyncio.sleep(0.02 * i)  # do not open them all in the same instant
    while attack.running():
        await attack.stream("inference", _silence(attack))


async def _silence(attack: Attack) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    """A request stream that sends nothing until the deadline."""
    await until(lambda: False, attack.deadline, period=0.5)
    return
    yield


async def trickle(attack: Attack) -> None:
    """Forward streams that send one small 'more follows' frame a second."""
    await workers(attack, attack.args.workers, _trickle_stream)


async def _trickle_stream(attack: Attack, i: int) -> None:
    await asyncio.sleep(0.02 * i)
    while attack.running():
        await attack.stream("forward_stream", _trickle_frames(attack))


async def _trickle_frames(attack: Attack) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    frame = runtime_pb2.ExpertRequest(metadata=b"\x01" + bytes(1024))
    while attack.running():
        attack.stats["frames"] += 1
        yield frame
        await asyncio.sleep(1.0)


# ---- 3. KV hog: sessions that together ask for the whole budget, kept alive by rare steps --------------


async def kv_hog(attack: Attack) -> None:
    """Take the whole budget, re-take whatever the server frees (an eviction, say), step each session rarely."""
    args = attack.args
    sessions: list[tuple[transport.MessageStream, int, int]] = []   # (stream, batch, max_length)
    per_token = await _token_cost(attack)
    next_step = time.monotonic() + args.keepalive
    for _ in range(100_000):  # bounded: one round per second at most
        if not attack.running():
            break
        sessions = [s for s in sessions if not s[0].closed]
        await _fill(attack, sessions, per_token)
        attack.stats["sessions_held"] = len(sessions)
        attack.stats["bytes_asked"] = sum(b * n for _, b, n in sessions) * per_token  # evicted ones too, unseen
        attack.ready.set()
        if time.monotonic() >= next_step:
            await asyncio.gather(*(_keep_alive(attack, stream, batch) for stream, batch, _ in sessions))
            next_step = time.monotonic() + args.keepalive
        await asyncio.sleep(min(1.0, attack.left()))
    for stream, _, _ in sessions:
        stream.close()


async def _info(attack: Attack, tries: int = 20) -> dict:
    """The server's info; a refusal for this peer's rate (its opens are charged their reservations) is waited out."""
    for _ in range(tries - 1):
        try:
            meta, _ = await transport.call(attack.p2p, attack.peer_id, "info", wire.pack({}), CALL_TIMEOUT)
            return meta
        except transport.ServerRejected as e:
            if "rate limit" not in e.reason:
                raise
            attack.answered(e.reason)
            await asyncio.sleep(0.5)
    meta, _ = await transport.call(attack.p2p, attack.peer_id, "info", wire.pack({}), CALL_TIMEOUT)
    return meta


async def _open(attack: Attack, batch: int, max_length: int) -> transport.MessageStream | None:
    args = attack.args
    stream = transport.MessageStream(attack.p2p, attack.peer_id)
    meta = {"type": "open", "start": args.start, "end": args.end, "max_length": max_length, "batch_size": batch,
            "session_id": secrets.token_hex(16)}
    attack.stats["opens"] += 1
    try:
        await stream.exchange(wire.pack(meta), CALL_TIMEOUT)
        return stream
    except transport.ServerFailure as e:
        attack.answered(e.reason)
        stream.close()
        return None


async def _token_cost(attack: Attack) -> int:
    """KV bytes one token of one sequence costs on this server: what a batch-1 session was charged per token."""
    free = (await _info(attack))["cache_bytes_free"]
    probe = await _open(attack, 1, attack.args.max_length)
    if probe is None:
        raise RuntimeError("the server refused even a batch-1 session")
    charged = free - (await _info(attack))["cache_bytes_free"]
    probe.close()
    for _ in range(50):  # until the server has released it, so that the fill sees the whole budget
        if (await _info(attack))["cache_bytes_free"] >= free:
            break
        await asyncio.sleep(0.1)
    return max(1, charged // attack.args.max_length)


async def _fill(attack: Attack, sessions: list, per_token: int) -> None:
    """Open sessions until the budget has no room left for even a short legitimate one."""
    args = attack.args
    for _ in range(args.max_sessions - len(sessions)):
        free = (await _info(attack))["cache_bytes_free"]
        rows = free // (per_token * args.max_length)
        batch, length = (min(rows, args.max_batch), args.max_length) if rows else (1, free // per_token)
        if length < 1 or not attack.running():
            return
        stream = await _open(attack, batch, length)
        if stream is None:
            return
        sessions.append((stream, batch, length))


async def _keep_alive(attack: Attack, stream: transport.MessageStream, batch: int) -> None:
    attack.stats["keepalive_steps"] += 1
    try:
        await stream.exchange(wire.pack({"step": 0}, {"hidden": torch.zeros(batch, 1, attack.args.hidden)}),
                              CALL_TIMEOUT)
    except transport.ServerFailure as e:
        attack.answered(e.reason)


# ---- 4. long-sequence flood: back-to-back forwards of max_tokens in one sequence -----------------------


async def long_seq(attack: Attack) -> None:
    args = attack.args
    data = wire.pack({"start": args.start, "end": args.end}, {"hidden": torch.randn(1, args.tokens, args.hidden)})

    async def loop(attack: Attack, _: int) -> None:
        while attack.running():
            await attack.call("forward", data)

    await workers(attack, args.workers, loop)


# ---- 5. header bombs: msgpack headers (<= 256 KiB) of nested empty arrays and maps -----------------------


def header_bombs() -> list[bytes]:
    """Messages whose header is nothing but containers, each as large as the header limit allows."""
    size = wire.HEADER_LIMIT
    n = wire.MAX_ITEMS
    deep = b"\x91" * (size - 1) + b"\x90"                                      # [[[[...]]]]
    wide = b"\xdc" + n.to_bytes(2, "big") + b"\x90" * n                         # [[], [], ...]
    maps = b"\xde" + n.to_bytes(2, "big") + b"".join(                            # {"k0": {}, "k1": {}, ...}
        msgpack.packb(f"k{i}") + b"\x80" for i in range(n))
    grid = b"\xdc" + (128).to_bytes(2, "big") + (b"\xdc" + (128).to_bytes(2, "big") + b"\x90" * 128) * 128
    legal = msgpack.packb({"meta": {"start": 0, "end": 1, "x": [[] for _ in range(8000)]}, "tensors": []})
    bombs = [deep, wide, maps, grid, legal]
    return [len(b).to_bytes(4, "little") + b for b in bombs if len(b) <= size]


async def headers(attack: Attack) -> None:
    bombs = header_bombs()

    async def loop(attack: Attack, i: int) -> None:
        for k in range(10**7):
            if not attack.running():
                return
            await attack.call("forward", bombs[(i + k) % len(bombs)])

    await workers(attack, attack.args.workers, loop)


# ---- 6. forged chain pushes with guessed session ids ---------------------------------------------------


async def push(attack: Attack) -> None:
    hidden = torch.zeros(1, 1, attack.args.hidden)

    async def loop(attack: Attack, _: int) -> None:
        for step in range(10**7):
            if not attack.running():
                return
            await attack.call("push", wire.pack({"session": secrets.token_hex(16), "step": step}, {"hidden": hidden}))

    await workers(attack, attack.args.workers, loop)


# ---- 7. opens the server must refuse: a malformed id, the largest batch and length ---------------------


async def rejected_open(attack: Attack) -> None:
    args = attack.args
    data = wire.pack({"type": "open", "start": args.start, "end": args.end, "max_length": args.max_length,
                      "batch_size": args.max_batch, "session_id": "short"})

    async def loop(attack: Attack, _: int) -> None:
        while attack.running():
            stream = transport.MessageStream(attack.p2p, attack.peer_id)
            attack.stats["opens"] += 1
            try:
                await stream.exchange(data, min(CALL_TIMEOUT, attack.left() + 1))
                attack.answered("opened")
            except transport.ServerFailure as e:
                attack.answered(e.reason)
            finally:
                stream.close()

    await workers(attack, args.workers, loop)


# ---- 8. session injection: our own session's steps ask the server to push to sessions we name -----------


async def inject(attack: Attack) -> None:
    """Each worker steps a session of its own whose every step asks the server to push its output to a guessed
    session (this server's own id as the next one), with a guessed push key: the server computes and pushes,
    and the push is refused for its key."""
    args = attack.args

    async def loop(attack: Attack, _: int) -> None:
        while attack.running():
            stream = await _open(attack, 1, args.max_length)
            if stream is None:
                await asyncio.sleep(0.5)
                continue
            for step in range(args.max_length):
                if not attack.running():
                    break
                target = {"peer": attack.peer_id, "session": secrets.token_hex(16), "key": secrets.token_hex(16)}
                attack.stats["sent"] += 1
                try:
                    await stream.exchange(wire.pack({"step": step, "push_to": target},
                                                    {"hidden": torch.zeros(1, 1, args.hidden)}), CALL_TIMEOUT)
                except transport.ServerFailure as e:
                    attack.answered(e.reason)
                    break
            stream.close()

    await workers(attack, attack.args.workers, loop)


# ---- 9. KV hog, active: the hog's sessions step every half second, never idle long ----------------------


async def kv_hog_active(attack: Attack) -> None:
    attack.args.keepalive = 0.5
    await kv_hog(attack)


# ---- 10. large unary calls: a daemon reads each whole before anyone checks it ---------------------------


async def unary_flood(attack: Attack) -> None:
    """Unary forward calls just under the server's daemon limit (transport.SERVER_UNARY_BYTES), and over it."""
    sizes = (transport.SERVER_UNARY_BYTES - (4 << 10), 4 << 20)

    async def loop(attack: Attack, i: int) -> None:
        request = runtime_pb2.ExpertRequest(metadata=bytes(sizes[i % 2]))
        while attack.running():
            attack.stats["sent"] += 1
            try:
                reply = await asyncio.wait_for(attack.p2p.call_protobuf_handler(
                    attack.peer, f"{transport.SERVICE}.rpc_forward", request, runtime_pb2.ExpertResponse),
                    min(CALL_TIMEOUT, attack.left() + 0.1))
                attack.answered(str(wire.unpack(reply.metadata)[0].get("error", "ok")))
            except Exception as e:  # the daemon hangs up on a call over its limit: a timeout
                attack.answered(type(e).__name__)

    await workers(attack, attack.args.workers, loop)


# ---- 11. open churn: valid opens of the largest session that fits, closed at once ------------------------


async def open_churn(attack: Attack) -> None:
    args = attack.args
    per_token = await _token_cost(attack)
    rows = max(1, min(args.max_batch, (await _info(attack))["cache_bytes_free"] // (per_token * args.max_length)))

    async def loop(attack: Attack, _: int) -> None:
        while attack.running():
            stream = await _open(attack, rows, args.max_length)
            if stream is not None:
                attack.answered("opened")
                stream.close()

    await workers(attack, args.workers, loop)


# ---- 12. the short lane: forwards just cheap enough, many in flight ---------------------------------------


async def short_lane(attack: Attack) -> None:
    """Forwards of 1 x `--tokens` tokens (1,400 was cheap enough for the old decoding lane)."""
    data = wire.pack({"start": attack.args.start, "end": attack.args.end},
                     {"hidden": torch.randn(1, min(1400, attack.args.tokens), attack.args.hidden)})

    async def loop(attack: Attack, _: int) -> None:
        while attack.running():
            await attack.call("forward", data)

    await workers(attack, attack.args.workers, loop)


# ---- 14. working memory: the longest forwards and backwards the server takes, after one it refuses ----------


async def working_memory(attack: Attack) -> None:
    """A forward and a backward of 1 x `--tokens` (the server's max tokens), each refused for its working memory;
    then forwards and backwards of the longest lengths the refusals name, as fast as they are answered."""
    args = attack.args

    def message(length: int, backward: bool) -> bytes:
        hidden = torch.randn(1, length, args.hidden)
        return wire.pack({"start": args.start, "end": args.end},
                         {"hidden": hidden, **({"grad_output": torch.randn_like(hidden)} if backward else {})})

    async def longest(method: str) -> int:
        try:
            await transport.call(attack.p2p, attack.peer_id, method, message(args.tokens, method == "backward"),
                                 CALL_TIMEOUT)
            return args.tokens
        except transport.ServerFailure as e:
            attack.answered(e.reason)
            found = re.search(r"send at most 1x(\d+) tokens", e.reason)
            return int(found.group(1)) if found else args.tokens

    requests = [message(await longest("forward"), False), message(await longest("backward"), True)]

    async def loop(attack: Attack, i: int) -> None:
        while attack.running():
            await attack.call("backward" if i % 2 else "forward", requests[i % 2])

    await workers(attack, args.workers, loop)


# ---- 13. info flood -----------------------------------------------------------------------------------


async def info_flood(attack: Attack) -> None:
    data = wire.pack({})

    async def loop(attack: Attack, _: int) -> None:
        while attack.running():
            await attack.call("info", data)

    await workers(attack, attack.args.workers, loop)


KINDS: dict[str, Callable[[Attack], Awaitable[None]]] = {
    "flood": flood, "idle": idle, "trickle": trickle, "kv_hog": kv_hog, "long_seq": long_seq,
    "headers": headers, "push": push, "rejected_open": rejected_open, "inject": inject,
    "kv_hog_active": kv_hog_active, "unary_flood": unary_flood, "open_churn": open_churn,
    "short_lane": short_lane, "info_flood": info_flood, "working_memory": working_memory}


# ---- the process ---------------------------------------------------------------------------------------


def print_stats(attack: Attack) -> None:
    print("STATS " + json.dumps({**attack.stats, "replies": dict(attack.replies.most_common(8))}), flush=True)


async def report(attack: Attack) -> None:
    """READY once, then STATS every second: the benchmark reads the last line even if it kills us."""
    await until(attack.ready.is_set, attack.deadline)
    if attack.ready.is_set():
        print(f"READY {attack.args.kind}", flush=True)
    while attack.running():
        print_stats(attack)
        await asyncio.sleep(min(1.0, attack.left() + 0.01))


def check_server(maddr: str) -> str:
    if not maddr.startswith("/ip4/127.0.0.1/") or "/p2p/" not in maddr:
        raise SystemExit(f"the server must be a loopback multiaddr with its /p2p/ peer id, not {maddr!r}")
    return maddr


async def server_address(args: argparse.Namespace) -> str:
    """--server, or what the benchmark writes to --go-file once the server is up."""
    if args.server:
        return check_server(args.server)
    await until(lambda: os.path.exists(args.go_file), time.monotonic() + GO_TIMEOUT)
    with open(args.go_file) as f:
        return check_server(f.read().strip())


async def main_async(args: argparse.Namespace) -> None:
    server = await server_address(args)
    p2p = await start_p2p(NetworkOptions(initial_peers=[server], startup_timeout=30.0))
    try:
        attack = Attack(p2p, server.rsplit("/p2p/", 1)[1], args, time.monotonic() + args.duration)
        reporter = asyncio.create_task(report(attack))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(KINDS[args.kind](attack), args.duration + 5)
        attack.deadline = 0.0
        await asyncio.wait_for(reporter, 5)
        print_stats(attack)
    finally:
        await stop_p2p(p2p)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("kind", choices=sorted(KINDS))
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="the server's multiaddr, /ip4/127.0.0.1/tcp/PORT/p2p/ID")
    where.add_argument("--go-file", help="wait for this file, then attack the multiaddr written in it")
    p.add_argument("--duration", type=float, required=True, help="seconds of attack, then exit")
    p.add_argument("--workers", type=int, default=1, help="streams or requests in flight at once")
    p.add_argument("--start", type=int, default=0, help="the first block the server serves")
    p.add_argument("--end", type=int, default=6, help="the block after its last")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--tokens", type=int, default=2048, help="long_seq: tokens per forward (the server's max)")
    p.add_argument("--max-length", type=int, default=2048, help="the server's max session length")
    p.add_argument("--max-batch", type=int, default=64, help="the server's max batch")
    p.add_argument("--max-sessions", type=int, default=32, help="kv_hog: sessions at most (the per-peer limit)")
    p.add_argument("--keepalive", type=float, default=20.0, help="kv_hog: seconds between steps of each session")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
