"""A client's link to the swarm: a background event loop running its libp2p daemon and DHT node.

Synchronous code (autograd, generation) calls `run(coro)`; the swarm view refreshes itself in the
background, and on demand when routing finds no server. Servers in view are pinged in the
background too (a timed info RPC), so routing can count the network as well as compute.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
from collections.abc import Coroutine
from typing import Any

from swarmtune import transport, wire
from swarmtune.client.bans import Bans
from swarmtune.client.config import ClientConfig
from swarmtune.client.span_requests import LoraShipments
from swarmtune.directory import SwarmView, fetch_model_info, fetch_servers
from swarmtune.p2p import NetworkOptions, start_dht, start_p2p, stop_p2p
from swarmtune.security import Membership

logger = logging.getLogger(__name__)

PING_PERIOD = 30.0      # seconds between pings of one server
PING_TIMEOUT = 5.0
MAX_PINGS = 32          # pings in flight at once
PING_SAMPLES = 3        # round trips timed per ping
RTT_SMOOTHING = 0.3     # weight of the newest ping in the moving average


class SwarmConnection:
    def __init__(self, config: ClientConfig, prefix: str, num_blocks: int | None = None):
        if not config.initial_peers:
            raise ValueError("initial_peers is empty: give the multiaddrs of at least one peer of the swarm")
        self.config, self.prefix = config, prefix
        self.bans = Bans(config.ban_base, config.ban_max)
        self.rtts: dict[str, float] = {}   # peer id -> smoothed round trip, seconds
        self.min_rtts: dict[str, float] = {}  # peer id -> fastest round trip seen: the link, without load
        self._pinged: dict[str, float] = {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="swarm-client", daemon=True)
        self._thread.start()
        self.p2p = self.dht = None
        self.token = ""  # proof of membership sent with every RPC (empty in an open swarm)
        self.channels: dict[str, transport.Channel] = {}  # per server: the stream forward/backward requests reuse
        self.lora_shipments = LoraShipments()  # which servers hold which versions of our LoRA
        self._refresher = None
        self._starting = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
        try:
            self._starting.result(config.startup_timeout + 10)
            if num_blocks is None:
                info = self.run(fetch_model_info(self.dht, prefix), timeout=config.request_timeout)
                if info is None:
                    raise RuntimeError(f"No swarm announces model {prefix!r} at {config.initial_peers}")
                num_blocks = info.num_blocks
            self.view = SwarmView(num_blocks)
            self.refresh()
            self._refresher = asyncio.run_coroutine_threadsafe(self._refresh_forever(), self.loop)
        except BaseException:
            self.close()
            raise

    async def _start(self) -> None:
        cfg = self.config
        membership = Membership.from_options(cfg.swarm_key, cfg.allowed_peers)
        opts = NetworkOptions(initial_peers=list(cfg.initial_peers), startup_timeout=cfg.startup_timeout,
                              identity_path=cfg.identity_path, membership=membership)
        self.p2p = await start_p2p(opts)
        self.dht = await start_dht(self.p2p, opts, client_mode=True)
        self.token = membership.token(str(self.p2p.peer_id))

    def channel(self, peer_id: str) -> transport.Channel:
        if peer_id not in self.channels:
            self.channels[peer_id] = transport.Channel(self.p2p, peer_id, self.token)
        return self.channels[peer_id]

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def update_view(self) -> None:
        self.view.servers = await fetch_servers(self.dht, self.prefix, self.view.num_blocks)

    def refresh(self) -> None:
        self.run(self.update_view(), timeout=self.config.request_timeout)

    async def ping_servers(self) -> None:
        """Time an info RPC to every server in view not pinged for PING_PERIOD; smooth it into `rtts`."""
        now = time.monotonic()
        for gone in set(self._pinged) - set(self.view.servers):
            del self._pinged[gone]
            self.rtts.pop(gone, None)
            self.min_rtts.pop(gone, None)
        due = [peer for peer in self.view.servers if now - self._pinged.get(peer, float("-inf")) >= PING_PERIOD]
        limit = asyncio.Semaphore(MAX_PINGS)
        await asyncio.gather(*(self._ping(peer, limit) for peer in due))

    async def _ping(self, peer_id: str, limit: asyncio.Semaphore) -> None:
        """A few info RPCs in a row: their median feeds the load-aware `rtts`; their fastest, `min_rtts`,
        which a single busy moment of either side would otherwise inflate until the next ping."""
        async with limit:
            if peer_id not in self._pinged:  # the first call also dials the peer: time the next ones
                await self._time_info(peer_id)
            samples = []
            for _ in range(PING_SAMPLES):
                rtt = await self._time_info(peer_id)
                if rtt is None:
                    break
                samples.append(rtt)
        self._pinged[peer_id] = time.monotonic()
        if samples:  # an unreachable server is left to the bans of failed requests
            rtt = statistics.median(samples)
            old = self.rtts.get(peer_id)
            self.rtts[peer_id] = rtt if old is None else old + RTT_SMOOTHING * (rtt - old)
            self.min_rtts[peer_id] = min(*samples, self.min_rtts.get(peer_id, rtt))

    async def _time_info(self, peer_id: str) -> float | None:
        """Seconds an info RPC to the server takes, or None if it fails."""
        began = time.perf_counter()
        try:
            await transport.call(self.p2p, peer_id, "info", wire.pack({}), PING_TIMEOUT, token=self.token)
        except transport.ServerRejected:  # it answered, if only to refuse: the round trip still counts
            pass
        except transport.ServerFailure:
            return None
        return time.perf_counter() - began

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.gather(self.ping_servers(), asyncio.sleep(self.config.refresh_period))
            try:
                await self.update_view()
            except Exception as e:  # keep the last view; the next refresh may succeed
                logger.debug(f"swarm view refresh failed: {e}")

    def close(self) -> None:
        """Stop background work, the DHT node and the daemon, then the loop (idempotent)."""
        if self.loop.is_running():
            try:
                self.run(self._stop(), timeout=40)
            except Exception as e:
                logger.debug(f"error while closing the swarm connection: {e}")
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)

    async def _stop(self) -> None:
        if not self._starting.done():  # stopped during the start (Ctrl-C): let it end, so that its daemon has an
            await asyncio.wait([asyncio.wrap_future(self._starting)], timeout=15)  # owner to stop it (hivemind's
            # start, cancelled half-way, leaves the daemon running and its pipe open)
        for channel in self.channels.values():
            channel.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:  # view refreshes, pings, streams of closed sessions
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=5)
        if self.dht is not None:
            await asyncio.wait_for(self.dht.shutdown(), 5)
        if self.p2p is not None:
            await stop_p2p(self.p2p)
