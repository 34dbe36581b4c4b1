"""What every request for a span of blocks needs, in training and in generation alike.

- its adapter: a server-hosted one by name, or the client's LoRA, whose tensors travel once per
  version and server and are named by digest afterwards (`LoraShipments`);
- checks of what the server returned (`check_output`);
- waiting for servers when some blocks have none, with backoff until a deadline (`wait_for_route`);
- bans of failed servers, and the end of retries when servers agree a request is invalid
  (`ban_failed`, `Refusals`);
- majority votes between servers that ran the same request (`vote`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import torch

from swarmtune.adapters.lora import ClientLora
from swarmtune.client.bans import Bans
from swarmtune.client.routing import Hop, NoServersError
from swarmtune.client.verification import odd_ones_out, tolerance
from swarmtune.directory import SwarmView
from swarmtune.records import ServerInfo
from swarmtune.transport import ServerFailure, ServerRejected

logger = logging.getLogger(__name__)
T = TypeVar("T")
UNKNOWN_DIGEST = "unknown LoRA digest"  # what a server answers when it no longer holds a LoRA version
MAX_VOTERS = 3
MAX_RATE_WAIT = 2.0  # seconds a client waits on a server's word for its own rate (a server's debts last about 1 s)


class RequestRefused(RuntimeError):
    """Servers refused the request itself (malformed, or larger than they allow): retrying will not help."""


class Refusals:
    """Tracks servers that refused a request as invalid.

    One such verdict could be a faulty server, so the client tries another; a second server
    agreeing, or having no other server to try, ends the retries with the servers' message.
    """

    def __init__(self):
        self.peers: set[str] = set()

    def check(self, error: ServerFailure, alternatives: int) -> None:
        if isinstance(error, ServerRejected) and not error.retry:
            self.peers.add(error.peer_id)
            if len(self.peers) >= 2 or alternatives == 0:
                raise RequestRefused(f"the swarm refused the request: {error.reason}") from error


class LoraShipments:
    """Which servers hold which versions of this client's LoRA, so each version travels to a server once.

    Servers keep a few versions per client; this remembers the latest MAX_HELD (peer, version) pairs,
    so a long training run does not grow it. Forgetting one costs a resend, never a wrong result.
    """

    MAX_HELD = 4096

    def __init__(self):
        self._held: OrderedDict[tuple[str, str], None] = OrderedDict()  # (peer id, digest), oldest first

    def holds(self, peer: str, digest: str) -> bool:
        return (peer, digest) in self._held

    def record(self, peer: str, digest: str) -> None:
        self._held[(peer, digest)] = None
        self._held.move_to_end((peer, digest))
        while len(self._held) > self.MAX_HELD:
            self._held.popitem(last=False)

    def fields(self, peer: str, lora: ClientLora, start: int, end: int, dropout: float, seed: int,
               resend: bool = False) -> tuple[dict | None, dict[str, torch.Tensor]]:
        """The 'lora' header for blocks [start, end), and its tensors unless the server holds them."""
        keys = lora.keys_in(start, end)
        if not keys:
            return None, {}
        digest = lora.digest(keys)
        meta = dict(keys=keys, scale=lora.scale, dropout=dropout, seed=seed, digest=digest)
        if not resend and self.holds(peer, digest):
            return meta, {}
        tensors = {}
        for i, key in enumerate(keys):
            a, b = lora.pair(key)
            tensors[f"lora.A.{i}"], tensors[f"lora.B.{i}"] = a.detach(), b.detach()
        return meta, tensors

    def send(self, request: Callable[[dict | None, dict[str, torch.Tensor]], T], hop: Hop,
             lora: ClientLora | None, active_adapter: str | None, dropout: float = 0.0, seed: int = 0) -> T:
        """`request(lora_header, lora_tensors)` with the span's adapter; once more with the tensors if the
        server forgot the version it was named by."""
        if active_adapter is not None:
            return request({"adapter": active_adapter}, {})
        if lora is None:
            return request(None, {})
        for resend in (False, True):
            meta, tensors = self.fields(hop.peer_id, lora, hop.start, hop.end, dropout, seed, resend)
            try:
                reply = request(meta, tensors)
            except ServerRejected as e:
                if meta is not None and not resend and UNKNOWN_DIGEST in e.reason:
                    self._held.pop((hop.peer_id, meta["digest"]), None)
                    continue
                raise
            if meta is not None:
                self.record(hop.peer_id, meta["digest"])
            return reply
        raise AssertionError("unreachable: the second attempt returns or raises")


def check_output(peer_id: str, t: torch.Tensor | None, shape: torch.Size, name: str) -> torch.Tensor:
    """`t` if it is what a server should have returned as `name`, else ServerFailure."""
    if t is None:
        raise ServerFailure(peer_id, f"reply lacks '{name}'")
    if t.shape != shape:
        raise ServerFailure(peer_id, f"'{name}' has shape {list(t.shape)}, expected {list(shape)}")
    if not all_finite(t):
        raise ServerFailure(peer_id, f"'{name}' contains NaN or infinite values")
    return t


def all_finite(t: torch.Tensor) -> bool:
    """Whether `t` holds no NaN or infinity: its extremes are finite (NaN propagates into them). One read of `t`
    and no full-size mask, where `isfinite(t).all()` costs ~8x more (a wide activation: ms per hop)."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def wait_for_route(route: Callable[[], T], refresh: Callable[[], None], deadline: float, model: str,
                   active_adapter: str | None) -> T:
    """`route()`, retried with growing pauses (re-reading the swarm) while some blocks have no server,
    until `deadline` (time.monotonic)."""
    delay = 0.2
    while True:
        try:
            return route()
        except NoServersError as e:
            if time.monotonic() + delay > deadline:
                raise NoServersError(e.blocks, model, active_adapter) from None
            time.sleep(delay)
            delay = min(2 * delay, 5.0)
            refresh()


def ban_failed(bans: Bans, hop: Hop, error: ServerFailure, what: str) -> None:
    """Ban the failed server; one that refused for our own request rate (saying how long to wait) is waited for
    instead, and stays usable: our own bursts (an open charged its reservation, then its first step, or info
    pings) are not its fault."""
    wait = getattr(error, "wait", None)
    if wait is not None and bans.excuse(hop.peer_id):
        logger.info(f"server {hop.peer_id} refused {what} for our request rate; waiting {wait:.2f} s")
        time.sleep(min(wait, MAX_RATE_WAIT))
        return
    duration = bans.ban(hop.peer_id, hop.server.expires)
    logger.warning(f"server {hop.peer_id} failed on blocks {hop.start}:{hop.end} during {what} ({error.reason}); "
                   f"banned for {duration:.0f} s")


def alternatives(view: SwarmView, hop: Hop, bans: Bans) -> int:
    """How many servers not banned could still take the hop's first block."""
    return len(view.covering(hop.start, bans))


def vote(results: dict[str, torch.Tensor], servers: dict[str, ServerInfo], bans: Bans, what: str,
         ask_another: Callable[[set[str]], tuple[ServerInfo, torch.Tensor] | None]) -> tuple[str, list[str]]:
    """The peer whose result a strict majority of servers shares, and the peers it outvoted (banned).

    `results` starts with the server whose result is on trial. While no majority forms, up to
    MAX_VOTERS servers are asked (`ask_another(peers asked so far)`, None when nobody is left).
    A result that nobody can check stands. Without a majority, every voter but the first is
    banned and the first fails: the caller retries elsewhere, trusting none of them.
    """
    first = next(iter(results))
    while True:
        verdict = odd_ones_out(results, tolerance(*servers.values())) if len(results) > 1 else None
        if verdict is not None or len(results) >= MAX_VOTERS:
            break
        more = ask_another(set(results))
        if more is None:
            if len(results) == 1:
                return first, []
            break
        server, result = more
        servers[server.peer_id], results[server.peer_id] = server, result
    if verdict is None:
        for peer in list(results)[1:]:
            bans.ban(peer, servers[peer].expires)
        raise ServerFailure(first, f"{what}: the result disagrees with other servers and no majority forms")
    winner, losers = verdict
    for peer in losers:
        duration = bans.ban(peer, servers[peer].expires)
        logger.warning(f"server {peer} disagrees with the majority on {what}; banned for {duration:.0f} s")
    return winner, losers
