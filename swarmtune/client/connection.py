"""A client's link to the swarm: a background event loop running its libp2p daemon and DHT node.

Synchronous code (autograd, generation) calls `run(coro)`; the swarm view refreshes itself in the
background, and on demand when routing finds no server.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from typing import Any

from swarmtune.client.config import ClientConfig
from swarmtune.client.swarm_view import Bans, SwarmView, fetch_model_info, fetch_servers
from swarmtune.p2p import NetworkOptions, start_dht, start_p2p

logger = logging.getLogger(__name__)


class SwarmConnection:
    def __init__(self, config: ClientConfig, prefix: str, num_blocks: int | None = None):
        if not config.initial_peers:
            raise ValueError("initial_peers is empty: give the multiaddrs of at least one peer of the swarm")
        self.config, self.prefix = config, prefix
        self.bans = Bans(config.ban_base, config.ban_max)
        self.rtts: dict[str, float] = {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="swarm-client", daemon=True)
        self._thread.start()
        self.p2p = self.dht = None
        self._refresher = None
        try:
            self.run(self._start(), timeout=config.startup_timeout + 10)
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
        opts = NetworkOptions(initial_peers=list(self.config.initial_peers),
                              startup_timeout=self.config.startup_timeout)
        self.p2p = await start_p2p(opts)
        self.dht = await start_dht(self.p2p, opts, client_mode=True)

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def update_view(self) -> None:
        self.view.servers = await fetch_servers(self.dht, self.prefix, self.view.num_blocks)
        self.view.updated = time.monotonic()

    def refresh(self) -> None:
        self.run(self.update_view(), timeout=self.config.request_timeout)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_period)
            try:
                await self.update_view()
            except Exception as e:  # keep the last view; the next refresh may succeed
                logger.debug(f"swarm view refresh failed: {e}")

    def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self.loop.is_running():
            async def stop():
                if self.dht is not None:
                    await asyncio.wait_for(self.dht.shutdown(), 5)
                if self.p2p is not None:
                    await self.p2p.shutdown()
            try:
                self.run(stop(), timeout=15)
            except Exception as e:
                logger.debug(f"error while closing the swarm connection: {e}")
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
