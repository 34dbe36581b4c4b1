"""What a server checks and charges before it spends anything on a peer's request, and how refusals go out.

Every request passes here: the caller's membership, its request rate (a request's cost counts: its
header's size, an open's KV reservation, a computation's tokens x attended positions), its open streams,
its tokens in flight, and the bytes it holds while being received. A refusal names the problem; one for
a malformed request counts REFUSAL_WEIGHT times toward the peer's rate, one for the peer's own excess
is held back a while (rate_limit.Tarpit).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from hivemind.proto import runtime_pb2

from swarmtune import transport, wire
from swarmtune.security import Membership
from swarmtune.server.executor import BACKWARD, PriorityExecutor
from swarmtune.server.rate_limit import RateLimiter, Tarpit
from swarmtune.server.receiving import Intake, ReceiveBudget
from swarmtune.server.requests import Limits, PeerOverLimit, RateLimited, RequestError, need
from swarmtune.server.streams import frame

logger = logging.getLogger(__name__)
ATTENTION_SCALE = 1024  # context length at which a token's attention costs about as much as the rest of it
REFUSAL_WEIGHT = 100    # a malformed request counts as this many toward its peer's request rate
COST_PER_REQUEST = 64   # compute (tokens x (1 + positions / ATTENTION_SCALE)) that counts as one request more
OPEN_SECONDS = 1.0      # reserving the whole KV budget counts as this many seconds of the peer's request rate
SMALL_HEADER = 256      # arrays and maps in a header parsed on the event loop: any request but one that ships LoRA
CONTAINERS_PER_REQUEST = 64  # a larger header counts as one request per this many (parsing costs)
MAX_PACE = 2.0          # seconds a session's step may wait for its peer's rate (a debt is at most 1 s's worth)

Handler = Callable[[dict, dict, str], Awaitable[bytes]]  # (meta, tensors, peer) -> reply


def error_reply(message: str, retry: bool = False, wait: float | None = None) -> bytes:
    """An error reply; `wait`: the seconds after which the same request from the same peer would fit its rate."""
    return wire.pack({"error": message, "retry": retry} | ({} if wait is None else {"wait": round(wait, 3)}))


class Gate:
    """The checks and charges of one server, shared by all its RPCs. Used from the event loop only."""

    def __init__(self, limits: Limits, membership: Membership, executor: PriorityExecutor, stats: defaultdict):
        self.limits, self.membership, self.executor, self.stats = limits, membership, executor, stats
        self.rates = RateLimiter(limits.requests_per_second_per_peer)
        self.tarpit = Tarpit(limits.refusal_delay)
        self.streams_per_peer: dict[str, int] = defaultdict(int)
        self.tokens_in_flight: dict[str, int] = defaultdict(int)
        # a peer may hold one whole message, plus its frames' framing (the membership token in each)
        self.receiving = ReceiveBudget(limits.max_receiving_bytes,
                                       limits.max_message_bytes + limits.max_message_bytes // 16)
        self._parser = ThreadPoolExecutor(1, thread_name_prefix="headers")

    def close(self) -> None:
        self._parser.shutdown(wait=False, cancel_futures=True)

    async def decode(self, data: bytes, peer: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """`wire.unpack`. A large header (up to wire.MAX_CONTAINERS arrays and maps, up to milliseconds of parsing)
        counts toward the peer's rate by its size before it is parsed, and is parsed on a thread of its own, so
        that the event loop goes on serving meanwhile."""
        containers = wire.containers_bound(data)
        if containers <= SMALL_HEADER:
            return wire.unpack(data, self.limits.max_message_bytes)
        cost = containers / CONTAINERS_PER_REQUEST
        if not self.rates.admit(peer, cost):
            raise RateLimited(f"rate limit: a header of up to {containers} arrays and maps counts as {cost:.0f} "
                              f"requests, more than this peer has left of its "
                              f"{self.limits.requests_per_second_per_peer:g} requests/s", cost)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._parser, wire.unpack, data, self.limits.max_message_bytes)

    def check_member(self, peer: str, token: str) -> None:
        if not self.membership.admits(peer, token):
            self.stats["refused_outsiders"] += 1
            raise RequestError(f"peer {peer} is not a member of this private swarm")

    def check_rate(self, peer: str, cost: float = 1.0) -> None:
        """Count a request (`cost` requests' worth) toward the peer's rate, or refuse it."""
        if not self.rates.admit(peer, cost):
            raise RateLimited(f"rate limit: more than {self.limits.requests_per_second_per_peer:g} requests/s "
                              f"from this peer" + (f" (this one counts as {cost:g})" if cost != 1 else ""), cost)

    def message_check(self, peer: str, member: bool = True) -> Callable[[str], None]:
        """What a stream checks on the first frame of each message, before it reads any more of it: the
        caller's membership (unless `member` is known already) and its request rate."""
        def check(token: str) -> None:
            if not member:
                self.check_member(peer, token)
            self.check_rate(peer)
        return check

    async def refused(self, peer: str, error: RequestError | wire.WireError) -> bytes:
        """The error reply to a refused request. A malformed one (the client's fault, not a busy server) counts
        REFUSAL_WEIGHT times toward the peer's request rate: refusing costs the server too, and honest clients
        rarely send one. One for the peer's own excess goes out after the tarpit's delay; one for its rate says
        how long the peer has to wait from then on (its client waits, rather than take this server for a faulty
        one)."""
        self.stats["rejected"] += 1
        retry = getattr(error, "retry", False)
        if not retry:
            self.rates.charge(peer, REFUSAL_WEIGHT - 1)
        elif isinstance(error, PeerOverLimit) and await self.tarpit.hold(peer):
            self.stats["refusals_held"] += 1
        wait = self.rates.wait(peer, error.cost) if isinstance(error, RateLimited) else None
        return error_reply(str(error), retry, wait)

    async def pace(self, peer: str) -> None:
        """Wait until the peer's rate admits one more request. A session's next step waits here, unread, rather
        than be refused (which would end the session): an open is charged its reservation into debt (up to a
        second's worth), and the session's own first step follows at once."""
        await asyncio.sleep(min(self.rates.wait(peer), MAX_PACE))

    async def guarded(self, handler: Handler, data: bytes, peer: str, token: str | None) -> bytes:
        """Decode, check the caller, run `handler(meta, tensors, peer)`; every failure becomes an error reply.
        A unary call passes its `token` and is admitted and charged here; a stream (`token` None) did both
        on the message's frames."""
        intake = Intake(self.receiving, peer)
        try:
            if token is not None:
                need(len(data) <= transport.UNARY_BYTES,
                     f"a unary call carries at most {transport.UNARY_BYTES} bytes, not {len(data)}: send larger "
                     f"messages as a stream")
                self.message_check(peer, member=False)(token)
                intake.charge(len(data))
            meta, tensors = await self.decode(data, peer)
            return await handler(meta, tensors, peer)
        except (RequestError, wire.WireError) as e:
            return await self.refused(peer, e)
        except Exception as e:
            logger.exception("request failed")
            self.stats["failed"] += 1
            return error_reply(f"server error: {type(e).__name__}: {e}", retry=True)
        finally:
            intake.release()

    async def counted(self, peer: str, responses: AsyncIterator[runtime_pb2.ExpertResponse]
                      ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """`responses`, while the stream counts toward its peer's open streams (each holds a socket, a task and
        the frame it is reading)."""
        if self.streams_per_peer[peer] >= self.limits.max_streams_per_peer:
            yield frame(await self.refused(peer, PeerOverLimit(
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

    def charge_open(self, peer: str, nbytes: int, kv_budget: int) -> None:
        """An open costs the server its reservation (allocated and zeroed now, held for the session): it counts
        toward the peer's rate by its share of the KV budget, so that opening and closing sessions in a loop
        is as limited as any other flood."""
        cost = 1 + OPEN_SECONDS * self.limits.requests_per_second_per_peer * nbytes / max(1, kv_budget)
        if not self.rates.admit(peer, cost):
            raise RateLimited(f"rate limit: a session of {nbytes} bytes of KV memory counts as {cost:.0f} "
                              f"requests, more than this peer has left of its "
                              f"{self.limits.requests_per_second_per_peer:g} requests/s", cost)

    async def compute(self, peer: str, tokens: int, context: int, priority: int, memory: int, fn, *args):
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
