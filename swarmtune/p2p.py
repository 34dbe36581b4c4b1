"""Starting hivemind's libp2p daemon and DHT node with the settings swarmtune relies on.

Local swarms (tests, benchmarks, the demo) listen on 127.0.0.1 only and switch off everything
that probes the network (NAT port mapping, AutoNAT, relays). A public server opts into those
with `public=True`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from dataclasses import dataclass, field

# bf16 tensors must not be widened to fp32 by hivemind's serializer (swarmtune's own wire format
# does not use it, but DHT values and any hivemind internals should agree).
os.environ.setdefault("USE_LEGACY_BFLOAT16", "0")

from hivemind.dht.node import DHTNode  # noqa: E402
from hivemind.p2p import P2P  # noqa: E402
from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE  # noqa: E402
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError  # noqa: E402
from hivemind.utils.auth import AuthRole, AuthRPCWrapper  # noqa: E402

from swarmtune.errors import UserError  # noqa: E402
from swarmtune.security import Identity, Membership, PeerSignatureValidator  # noqa: E402

MAX_FRAME_BYTES = DEFAULT_MAX_MSG_SIZE + (64 << 10)  # hivemind's own streams send chunks of 4 MiB, plus framing


@dataclass
class NetworkOptions:
    host: str = "127.0.0.1"
    port: int = 0
    initial_peers: list[str] = field(default_factory=list)
    announce_maddrs: list[str] = field(default_factory=list)
    identity_path: str | None = None
    check_identity: bool = True       # make sure no other peer already uses this identity
    public: bool = False
    startup_timeout: float = 30.0
    membership: Membership = field(default_factory=Membership)
    max_unary_bytes: int = DEFAULT_MAX_MSG_SIZE  # unary calls (and their replies) through the daemon, at most

    def host_maddrs(self) -> list[str]:
        kind = "ip6" if ":" in self.host else "ip4"
        return [f"/{kind}/{self.host}/tcp/{self.port}"]


class FrameTooLarge(asyncio.IncompleteReadError):
    """A stream frame announced more bytes than any peer sends: the stream is closed, as if the peer hung up."""


def bound_stream_frames(max_bytes: int) -> None:
    """hivemind reads a stream frame whole at whatever length its 8-byte prefix claims, before any handler
    sees it, so one frame could make us buffer gigabytes. Refuse a frame longer than `max_bytes` on its
    prefix: the stream ends there (hivemind treats the error like a hang-up) and nothing is read."""
    async def receive_bounded(reader: asyncio.StreamReader) -> bytes:
        header = await reader.readexactly(P2P.HEADER_LEN)
        length = int.from_bytes(header, P2P.BYTEORDER)
        if length > max_bytes:
            raise FrameTooLarge(header, length)
        return await reader.readexactly(length)

    P2P.receive_raw_data = staticmethod(receive_bounded)


async def start_p2p(opts: NetworkOptions) -> P2P:
    """A libp2p daemon bound as `opts` says; raises if it does not come up within the timeout.

    The daemon runs in a session of its own, so a Ctrl-C or SIGTERM sent to our process group
    reaches only us, and we can still withdraw from the DHT before stopping it. hivemind leaves a
    daemon whose start is cancelled running, unowned: a start cut short here (by a timeout, or a
    cancellation as the command stops) waits for it and stops it.
    """
    bound_stream_frames(MAX_FRAME_BYTES)
    try:
        with _daemon_in_own_session():
            creating = asyncio.ensure_future(_create_p2p(opts))
            try:
                return await asyncio.wait_for(asyncio.shield(creating), opts.startup_timeout + 5)
            except (asyncio.CancelledError, asyncio.TimeoutError):
                await _stop_when_started(creating)
                raise
    except P2PDaemonError as e:
        reason = re.sub(r"^Daemon failed to start:\s*(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?", "", str(e))
        if "bootstrap peers" in reason:
            raise UserError(f"none of the initial peers answered ({' '.join(opts.initial_peers)}): check the "
                            f"addresses and that the swarm is running") from None
        raise UserError(f"the libp2p daemon did not start: {reason}") from None
    except asyncio.TimeoutError:
        raise UserError(f"the libp2p daemon did not start within {opts.startup_timeout:g} s") from None


async def _stop_when_started(creating: asyncio.Future, timeout: float = 10) -> None:
    """Stop the daemon that `creating` starts, once it has (it may never: then there is nothing to stop)."""
    try:
        p2p = await asyncio.wait_for(asyncio.shield(creating), timeout)
    except (Exception, asyncio.CancelledError):
        creating.cancel()
        return
    await stop_p2p(p2p)


@contextlib.contextmanager
def _daemon_in_own_session():
    original = asyncio.subprocess.create_subprocess_exec

    def create(*args, **kwargs):
        return original(*args, **kwargs, start_new_session=True)

    asyncio.subprocess.create_subprocess_exec = create
    try:
        yield
    finally:
        asyncio.subprocess.create_subprocess_exec = original


async def _create_p2p(opts: NetworkOptions) -> P2P:
    return await P2P.create(
        initial_peers=opts.initial_peers or None,
        host_maddrs=opts.host_maddrs(),
        announce_maddrs=opts.announce_maddrs or None,
        identity_path=opts.identity_path,
        check_if_identity_free=opts.check_identity,
        nat_port_map=opts.public,
        auto_nat=opts.public,
        use_relay=opts.public,
        use_auto_relay=opts.public,
        startup_timeout=opts.startup_timeout,
        persistent_conn_max_msg_size=opts.max_unary_bytes,
    )


async def stop_p2p(p2p: P2P, timeout: float = 10) -> None:
    """Stop the daemon and wait until it and its subprocess transport are gone.

    hivemind stops reading the daemon's output before it stops the daemon: output left unread pauses the pipe,
    and then the wait for the daemon never ends, and the open transport, collected after its loop has closed,
    prints an "Event loop is closed" traceback at exit. Closing the pipe first avoids both; a daemon still
    there after `timeout` is killed.
    """
    transport = getattr(p2p._child, "_transport", None)
    if transport is not None and (pipe := transport.get_pipe_transport(1)) is not None:
        pipe.close()
    try:
        await asyncio.wait_for(p2p.shutdown(), timeout)
    except asyncio.TimeoutError:
        if transport is None:
            raise
        transport.close()  # kills the daemon


async def start_dht(p2p: P2P, opts: NetworkOptions, client_mode: bool = False,
                    identity: Identity | None = None) -> DHTNode:
    """A DHT node over `p2p` that accepts only signed records (and, in a private swarm, only members).

    Raises TimeoutError rather than hanging when bootstrap peers are unreachable.
    """
    members = opts.membership
    node = await asyncio.wait_for(DHTNode.create(
        p2p=p2p, initial_peers=opts.initial_peers or None, client_mode=client_mode,
        record_validator=PeerSignatureValidator(identity, members.allowed_peers), authorizer=members.authorizer(),
    ), opts.startup_timeout)
    if members.allowed_peers is not None and not client_mode:
        await _admit_only(node, members)
    return node


async def _admit_only(node: DHTNode, members: Membership) -> None:
    """Re-register the DHT's handlers so that peers outside the allowlist get no answer."""
    protocol = node.protocol
    await protocol.remove_p2p_handlers(protocol.p2p)
    inner = AuthRPCWrapper(protocol, AuthRole.SERVICER, protocol.authorizer)
    await protocol.add_p2p_handlers(protocol.p2p, wrapper=_Gate(inner, members.allowed_peers))


class _Gate:
    """Forwards rpc_* calls from allowed peers; refuses the rest."""

    def __init__(self, inner, allowed: set[str]):
        self._inner, self._allowed = inner, allowed

    def __getattr__(self, name: str):
        method = getattr(self._inner, name)

        async def gated(request, context):
            if str(context.remote_id) not in self._allowed:
                raise PermissionError(f"peer {context.remote_id} is not a member of this private swarm")
            return await method(request, context)

        return gated


async def visible_maddrs(p2p: P2P) -> list[str]:
    return [f"{addr}/p2p/{p2p.peer_id}" if "/p2p/" not in str(addr) else str(addr)
            for addr in await p2p.get_visible_maddrs()]
