"""What one request, one client and one connection may take of the endpoint, checked before it is taken.

- The request body is counted as it arrives (`BodyLimit`, an ASGI middleware): a declared
  Content-Length above the limit is a 413 before a byte is read, and a body that grows past it
  (chunked, or lying about its length) is a 413 as soon as it does, so nothing is parsed or
  tokenized. A body that takes longer than `body_timeout_s` to arrive is a 408.
- A connection whose request line and headers take longer than `header_timeout_s` is closed
  (`guarded_h11`): uvicorn times idle keep-alive connections, not slow headers.
- `Admission` charges each request its sequences (prompts x n) against its client's address and
  against the whole server before any work: beyond either bound, a 429 with Retry-After, held back
  for that long (`hold`), so that a client retrying at once costs the server one refusal a second per
  connection rather than as many as it can send (each costs the event loop a request's parsing).
- Sequences a client hangs up on before they finish are work done for nobody: a client that left
  `per_client` of them in the last `HANGUP_WINDOW_S` gets 429s until the oldest ages out. Streams opened
  and dropped at once would otherwise keep the batch busy with prefills nobody reads (on CPUs a row is
  not free: every client's steps slow down). A client that reads its answers never meets this.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

from swarmtune.api.protocol import APIError

RETRY_AFTER_S = 1  # what a 429 tells the client to wait: sequences finish and free rows every step
MAX_HELD = 1024    # 429s held back at once (beyond: answered at once)
HANGUP_WINDOW_S = 10.0  # how long a sequence hung up on counts against its client
MAX_CLIENTS_TRACKED = 4096  # clients with hang-ups on record before the stale ones are swept


@dataclasses.dataclass(frozen=True)
class EndpointLimits:
    """The endpoint's limits (serve.yaml's `limits`)."""

    max_body_kb: int = 2048          # request body, before parsing
    max_choices: int = 8             # prompts x n in one request
    max_request_tokens: int = 32768  # (prompt + max_tokens) x n, summed over a request's prompts
    per_client: int = 8              # sequences one client address may have running or queued
    max_sequences: int = 64          # sequences all clients together may have running or queued
    header_timeout_s: float = 10.0   # request line and headers
    body_timeout_s: float = 30.0     # the whole body, once the headers are in
    keep_alive_s: float = 5.0        # an idle connection between requests

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise ValueError(f"limits.{field.name} must be > 0, got {getattr(self, field.name)!r}")
        if not self.max_choices <= self.per_client <= self.max_sequences:
            raise ValueError(f"limits must keep max_choices ({self.max_choices}) <= per_client ({self.per_client}) "
                             f"<= max_sequences ({self.max_sequences})")


class Admission:
    """Sequences running or queued, per client address and in all; only touched on the event loop."""

    def __init__(self, per_client: int, total: int):
        self.per_client, self.total = per_client, total
        self.by_client: dict[str, int] = {}
        self.in_flight = 0
        self.held = 0
        self.hangups: dict[str, collections.deque[float]] = {}  # when each client's last hang-ups were

    def take(self, client: str, cost: int) -> Callable[[int], None]:
        """Charge `cost` sequences to `client`, or raise a 429; returns the (idempotent) release, which is told
        how many of them the client hung up on."""
        if self._recent_hangups(client) >= self.per_client:
            raise busy(f"this client hung up on {self.per_client} sequences in the last {HANGUP_WINDOW_S:g} s "
                       "before they finished: read the answers you ask for")
        held = self.by_client.get(client, 0)
        if held + cost > self.per_client:
            raise busy(f"this client already has {held} sequences running or queued (at most {self.per_client}): "
                       "wait for them to finish")
        if self.in_flight + cost > self.total:
            raise busy(f"the server has {self.in_flight} sequences running or queued (at most {self.total}): "
                       "retry shortly")
        self.by_client[client] = held + cost
        self.in_flight += cost
        released = False

        def release(hung_up: int = 0) -> None:
            nonlocal released
            if released:
                return
            released = True
            self.in_flight -= cost
            left = self.by_client[client] - cost
            if left:
                self.by_client[client] = left
            else:
                del self.by_client[client]
            if hung_up:
                self._note_hangups(client, min(hung_up, cost))

        return release

    def _recent_hangups(self, client: str) -> int:
        times = self.hangups.get(client)
        if times is None:
            return 0
        while times and times[0] < time.monotonic() - HANGUP_WINDOW_S:
            times.popleft()
        if not times:
            del self.hangups[client]
        return len(times)

    def _note_hangups(self, client: str, count: int) -> None:
        if client not in self.hangups and len(self.hangups) >= MAX_CLIENTS_TRACKED:
            for stale in list(self.hangups):
                self._recent_hangups(stale)
        times = self.hangups.setdefault(client, collections.deque(maxlen=self.per_client))
        times.extend([time.monotonic()] * count)

    async def hold(self) -> None:
        """Wait out a refusal's Retry-After before it goes out (at most MAX_HELD at once)."""
        if self.held >= MAX_HELD:
            return
        self.held += 1
        try:
            await asyncio.sleep(RETRY_AFTER_S)
        finally:
            self.held -= 1


def busy(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_exceeded", code="rate_limit_exceeded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


class BodyLimit:
    """ASGI middleware: 413 for a body above `max_bytes` (declared or counted), 408 for one slower than `timeout_s`.

    A body found too large or too slow on the way is not the app's to answer (it would call it malformed):
    reading it stops, and whatever the app then answers is replaced by the 413 or 408."""

    def __init__(self, app, max_bytes: int, timeout_s: float, refused: Callable[[int], None] = lambda status: None):
        self.app, self.max_bytes, self.timeout_s, self.refused = app, max_bytes, timeout_s, refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send, APIError(413, self._too_large(), code="request_too_large"))
        received, complete, refusal = 0, False, None
        deadline = time.monotonic() + self.timeout_s

        async def counted():
            nonlocal received, complete, refusal
            if complete:  # the body is in: later receives wait for the client to hang up, without a deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                refusal = APIError(408, f"the request body took longer than {self.timeout_s:g} s", code="timeout")
                raise BodyRefused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    refusal = APIError(413, self._too_large(), code="request_too_large")
                    raise BodyRefused
            return message

        started = False

        async def answer(message):
            nonlocal started
            if refusal is None:
                await send(message)
            elif not started:
                await self._refuse(send, refusal)
            started = True

        try:
            await self.app(scope, counted, answer)
        except BodyRefused:
            if not started:
                await self._refuse(send, refusal)

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_bytes // 1024} KiB (serve's limits.max_body_kb)"

    async def _refuse(self, send, error: APIError) -> None:
        self.refused(error.status)
        body = error.json()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class BodyRefused(Exception):
    """Raised into the app's read of a body that `BodyLimit` refuses."""


def guarded_h11(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request line and headers take over `header_timeout_s`
    (from the connection's start, or from the previous response on a kept-alive one)."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are complete
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # the next request's headers; super() may start a pipelined one, which disarms
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app, limits: EndpointLimits, **kwargs):
    """uvicorn's Config for `app` under `limits`: h11 with the header guard, the keep-alive timeout, 16 KiB headers."""
    import uvicorn

    return uvicorn.Config(app, http=guarded_h11(limits.header_timeout_s), timeout_keep_alive=limits.keep_alive_s,
                          h11_max_incomplete_event_size=16 * 1024, log_level="warning", **kwargs)
