"""A server process: load a span of blocks, join the swarm, announce, serve until told to stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import torch
from hivemind.utils import get_dht_time

from swarmtune import records
from swarmtune.models import load_config, load_span, parse_dtype
from swarmtune.models.family import get_family
from swarmtune.p2p import NetworkOptions, start_dht, start_p2p, visible_maddrs
from swarmtune.records import ModelInfo, ServerInfo
from swarmtune.server.executor import PriorityExecutor
from swarmtune.server.faults import Faults
from swarmtune.server.handler import BlockServicer, HandlerConfig
from swarmtune.server.lora import wrap_targets
from swarmtune.server.requests import Limits
from swarmtune.server.sessions import CacheBudget
from swarmtune.version import __version__

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    model: str
    blocks: tuple[int, int]
    network: NetworkOptions = field(default_factory=NetworkOptions)
    dtype: str = "fp32"
    device: str = "cpu"
    dht_prefix: str | None = None
    attn_implementation: str = "sdpa"
    revision: str | None = None
    num_threads: int | None = None
    cache_bytes: int = 256 << 20
    update_period: float = 15.0       # seconds between announcements
    expiration: float = 45.0          # an announcement's lifetime
    throughput: float | None = None   # announced forward tokens/s per block (None: measure)
    limits: Limits = field(default_factory=Limits)
    session_timeout: float = 60.0
    alloc_timeout: float = 10.0
    faults: str | None = None         # test-only misbehaviour, see swarmtune.server.faults


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.stop_event = asyncio.Event()
        self.p2p = self.dht = self.servicer = None
        self.executor: PriorityExecutor | None = None

    @property
    def prefix(self) -> str:
        return self.config.dht_prefix or records.dht_prefix(self.config.model)

    def load(self):
        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        model_config = load_config(cfg.model, cfg.attn_implementation, cfg.revision)
        start, end = cfg.blocks
        span = load_span(cfg.model, start, end, parse_dtype(cfg.dtype), cfg.device, cfg.attn_implementation,
                         cfg.revision, config=model_config)
        wrap_targets(span.blocks, start, get_family(model_config.model_type).lora_targets)
        return model_config, span

    def server_info(self, state: str) -> ServerInfo:
        span = self.servicer.span
        cache_tokens = self.servicer.budget.free // max(1, span.make_cache_nbytes(1, 1))
        return ServerInfo(
            peer_id=str(self.p2p.peer_id), start=span.start, end=span.end, state=state,
            throughput=self.config.throughput or 1.0, inference_rps=1.0,
            dtype=str(span.compute_dtype).replace("torch.", ""), quant="none",
            cache_tokens_left=int(cache_tokens), adapters=tuple(self.servicer.hosted_adapters),
            version=__version__, addrs=tuple(self.maddrs),
        )

    async def announce(self, state: str) -> None:
        info = self.server_info(state)
        start, end = info.span
        expiration = get_dht_time() + self.config.expiration
        keys = [records.block_key(self.prefix, i) for i in range(start, end)]
        model_info = ModelInfo(self.servicer.span.config.num_hidden_layers, self.config.model,
                               self.servicer.span.config.model_type)
        await self.dht.store_many(
            keys + [self.prefix], [info.to_record()] * len(keys) + [model_info.to_record()],
            expiration_time=expiration, subkeys=[info.peer_id] * len(keys) + [None])

    async def run(self) -> None:
        cfg = self.config
        model_config, span = self.load()
        self.executor = PriorityExecutor()
        self.p2p = await start_p2p(cfg.network)
        self.dht = await start_dht(self.p2p, cfg.network)
        self.maddrs = await visible_maddrs(self.p2p)
        handler_config = HandlerConfig(cfg.limits, cfg.session_timeout, cfg.alloc_timeout,
                                       faults=Faults.parse(cfg.faults))
        info = dict(model=cfg.model, start=span.start, end=span.end, dtype=str(span.compute_dtype),
                    version=__version__, peer_id=str(self.p2p.peer_id))
        self.servicer = BlockServicer(span, self.executor, CacheBudget(cfg.cache_bytes), handler_config, info)
        await self.servicer.add_p2p_handlers(self.p2p)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        await self.announce("online")
        print(f"SERVING blocks {span.start}:{span.end} of {cfg.model} as {self.p2p.peer_id}", flush=True)
        for addr in self.maddrs:
            print(f"MADDR {addr}", flush=True)
        try:
            while not self.stop_event.is_set():
                try:
                    await asyncio.wait_for(self.stop_event.wait(), cfg.update_period)
                except asyncio.TimeoutError:
                    await self.announce("online")
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        logger.info("shutting down: withdrawing the announcement")
        try:
            await asyncio.wait_for(self.announce("offline"), 5)
        except Exception as e:  # the swarm may already be gone; exiting cleanly matters more
            logger.warning(f"could not withdraw the announcement: {e}")
        if self.dht is not None:
            await asyncio.wait_for(self.dht.shutdown(), 5)
        if self.p2p is not None:
            await self.p2p.shutdown()
        if self.executor is not None:
            self.executor.shutdown()
