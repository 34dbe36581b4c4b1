"""A server process: load a span of blocks, join the swarm, announce, serve until told to stop."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import random
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from hivemind.utils import get_dht_time

from swarmtune import records, transport, wire
from swarmtune.adapters.lora import ClientLora
from swarmtune.directory import fetch_swarm, fetch_unreachable
from swarmtune.errors import UserError
from swarmtune.models import load_config, load_span, parse_dtype
from swarmtune.models.registry import get_family
from swarmtune.models.span import SpanModel
from swarmtune.p2p import NetworkOptions, start_dht, start_p2p, stop_p2p, visible_maddrs
from swarmtune.records import ModelInfo, ServerInfo
from swarmtune.security import Identity
from swarmtune.server import block_selection, compute, cuda, host_memory, throughput, working_memory
from swarmtune.server.executor import PriorityExecutor
from swarmtune.server.handler import BlockServicer
from swarmtune.server.handler_config import HandlerConfig
from swarmtune.server.hosted_adapters import read_hosted
from swarmtune.server.lora import wrap_targets
from swarmtune.server.quantize import quantize
from swarmtune.server.served import MAX_POSITION
from swarmtune.server.sessions import CacheBudget
from swarmtune.version import __version__

logger = logging.getLogger(__name__)
PING_TIMEOUT = 2.0  # a server that does not answer an info call within this is taken for dead when planning


@dataclass
class ServerConfig:
    model: str
    blocks: tuple[int, int] | None = None   # the span to serve; None: choose where the swarm needs it
    num_blocks: int | None = None           # how many to choose (None: as many as fit in free memory); with blocks
                                            # of unequal size, the memory of as many of the largest
    balance_period: float = 10.0            # mean seconds between checks whether to move (a DHT read, a few pings)
    poll_period: float = 2.0                # small swarms: a DHT read this often (up to 16 servers: pings of all)
    throughput_cache: str | None = None     # directory of the measured-throughput cache (None: ~/.cache/swarmtune)
    network: NetworkOptions = field(default_factory=NetworkOptions)
    dtype: str = "fp32"
    quant: str = "none"               # none, int8 or nf4 (bitsandbytes)
    adapters: list[str] = field(default_factory=list)  # hosted adapters: NAME=PATH_OR_ID or PATH_OR_ID
    device: str = "cpu"
    dht_prefix: str | None = None
    attn_implementation: str = "sdpa"
    revision: str | None = None
    num_threads: int | None = None
    cache_bytes: int | None = 256 << 20   # KV cache budget; None: what free memory allows once blocks are loaded
    update_period: float = 15.0       # seconds between announcements
    expiration: float = 45.0          # an announcement's lifetime
    throughput: float | None = None   # announced forward tokens/s per block (None: measure)
    handler: HandlerConfig = field(default_factory=HandlerConfig)  # limits, timeouts, memory for requests


def check_span(cfg: ServerConfig, num_layers: int) -> None:
    """--blocks and --num-blocks within the model, before this server measures, joins or announces anything."""
    if cfg.blocks is not None and cfg.blocks[1] > num_layers:
        start, end = cfg.blocks
        raise UserError(f"--blocks {start}:{end}: {cfg.model} has {num_layers} blocks (0:{num_layers}): give a span "
                        "within them")
    if cfg.num_blocks is not None and cfg.num_blocks > num_layers:
        raise UserError(f"--num-blocks {cfg.num_blocks}: {cfg.model} has {num_layers} blocks: give at most "
                        f"{num_layers}, or --num-blocks auto")


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.stop_event = asyncio.Event()
        self.p2p = self.dht = self.servicer = None
        self.executor: PriorityExecutor | None = None
        self.model_config = self.speed = None
        self.sizes: tuple[float, ...] | None = None  # the blocks' relative sizes (None: all alike)
        self.capacity: float | None = None  # memory for blocks, in the model's largest (None: the span was given)
        self.blocks: tuple[int, int] | None = None   # the whole span held (some of it maybe still loading)
        self.state = "joining"
        self.adapters: dict[str, ClientLora] = {}  # hosted adapters' LoRA, read once
        self.cache_bytes = config.cache_bytes      # the KV budget (--cache-mb auto: None until the first span loads)
        self.found_dead: dict[str, float] = {}     # peers whose record did not answer a ping: the record's expiry

    @property
    def prefix(self) -> str:
        return self.config.dht_prefix or records.dht_prefix(self.config.model)

    def prepare(self) -> None:
        """Read the model's config and this machine's speed for it (a short benchmark, cached on disk)."""
        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        cuda.configure(cfg.device)
        host_memory.return_freed_memory()  # before the benchmark's random block
        self.model_config = load_config(cfg.model, cfg.attn_implementation, cfg.revision)
        check_span(cfg, self.model_config.num_hidden_layers)
        self.sizes = block_selection.relative_sizes(throughput.block_sizes(self.model_config))
        self.speed = throughput.get_throughput(self.model_config, parse_dtype(cfg.dtype), cfg.device, cfg.quant,
                                               cfg.throughput_cache)

    def working_budget(self) -> working_memory.WorkingMemory:
        """The budget for requests' activations: --working-memory-mb, else its share of free memory, measured
        before any block loads."""
        nbytes = self.config.handler.working_bytes
        if nbytes is None:
            nbytes = working_memory.auto_bytes(throughput.free_bytes(self.config.device))
            logger.info(f"working memory budget: {nbytes >> 20} MiB (auto)")
        return working_memory.WorkingMemory(nbytes)

    def load(self, start: int, end: int) -> SpanModel:
        cfg = self.config
        device = "cpu" if cfg.quant != "none" else cfg.device  # bitsandbytes quantizes on the move to the device
        span = load_span(cfg.model, start, end, parse_dtype(cfg.dtype), device, cfg.attn_implementation,
                         cfg.revision, config=self.model_config)
        time.sleep(cfg.handler.faults.load * (end - start))
        span = quantize(span, cfg.quant, span.compute_dtype, cfg.device)
        wrap_targets(span.blocks, start, get_family(self.model_config.model_type).lora_targets)
        # bitsandbytes rearranges a quantized layer's state on its first forward, unlocked: do that here, on
        # one thread, before two compute lanes can run the layers at once
        compute.forward(span, torch.zeros(1, 1, self.model_config.hidden_size), None, None, None, None)
        return span

    def server_info(self, state: str) -> ServerInfo:
        """Our record: online, the blocks served now, and the whole span as target while some still load."""
        start, end = self.blocks
        servicer = self.servicer
        served = (servicer.span.start, servicer.span.end) if servicer and state == "online" else self.blocks
        cache_tokens = servicer.span.cache_tokens_for(servicer.budget.free, MAX_POSITION) if servicer else 0
        return ServerInfo(
            peer_id=str(self.p2p.peer_id), start=served[0], end=served[1], state=state,
            target=None if served == self.blocks else self.blocks, pinned=self.config.blocks is not None,
            throughput=self.config.throughput or self.speed.forward, capacity=self.capacity or 0.0,
            inference_rps=self.speed.inference / (end - start),
            dtype=str(parse_dtype(self.config.dtype)).replace("torch.", ""), quant=self.config.quant,
            cache_tokens_left=int(cache_tokens), adapters=tuple(servicer.hosted_adapters) if servicer else (),
            tokens_in_flight=self.config.handler.limits.max_tokens_in_flight_per_peer,
            version=__version__, addrs=tuple(self.maddrs),
        )

    async def announce(self, state: str) -> None:
        info = self.server_info(state)
        start, end = info.whole_span
        expiration = get_dht_time() + self.config.expiration
        keys = [records.block_key(self.prefix, i) for i in range(start, end)]
        model = ModelInfo(self.model_config.num_hidden_layers, self.config.model, self.model_config.model_type)
        await self.dht.store_many(
            keys + [self.prefix, records.MODELS_KEY],
            [info.to_record()] * len(keys) + [model.to_record(), model.to_record(self.prefix)],
            expiration_time=expiration, subkeys=[info.peer_id] * (len(keys) + 2))

    async def run(self) -> None:
        cfg = self.config
        self.prepare()
        self.executor = PriorityExecutor(memory=self.working_budget())
        # the daemon's identity key also signs our DHT records, so load (or create) it here
        identity = Identity.load_or_create(cfg.network.identity_path)
        network = dataclasses.replace(cfg.network, identity_path=identity.path,
                                      check_identity=cfg.network.identity_path is not None,
                                      max_unary_bytes=transport.SERVER_UNARY_BYTES)  # not 4 MiB per call in flight
        self.p2p = await start_p2p(network)
        self.dht = await start_dht(self.p2p, network, identity=identity)
        self.maddrs = await visible_maddrs(self.p2p)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        balancer = None
        try:
            for addr in self.maddrs:  # before SERVING, so whoever waits for SERVING knows the addresses
                print(f"MADDR {addr}", flush=True)
            self.adapters = read_hosted(cfg.adapters, self.model_config, cfg.revision)
            self.blocks = cfg.blocks or await self.choose_blocks()
            await self.claim(self.blocks[0])
            await self.load_blocks(None)
            if cfg.blocks is None:
                balancer = asyncio.create_task(self.balance_forever())
            while not self.stop_event.is_set():
                try:
                    await asyncio.wait_for(self.stop_event.wait(), cfg.update_period)
                except asyncio.TimeoutError:
                    await self.announce(self.state)
        finally:
            if balancer is not None:
                balancer.cancel()
            await self.shutdown()

    async def load_blocks(self, kept: SpanModel | None) -> None:
        """Load `self.blocks` block by block, serving each as it comes (and `kept`, blocks already held, meanwhile).

        Holes first (`block_selection.load_order`): a server filling a gap serves it within seconds,
        rather than once its whole span is loaded. Clients route by the blocks served so far; other
        servers plan with the whole span. With --cache-mb auto the first span loads whole: the KV
        budget is what the loaded blocks leave of free memory.
        """
        cfg = self.config
        start, end = self.blocks
        if self.cache_bytes is None:
            free_before = throughput.free_bytes(cfg.device)
            span = await asyncio.to_thread(self.load, start, end)
            self.cache_bytes = self.cache_budget(free_before)
            await self.serve(span)
        else:
            order = block_selection.load_order(await self.anticipated_throughputs(), start, end - start,
                                               range(kept.start, kept.end) if kept is not None else range(0))
            span = kept
            for block in order:
                loaded = await asyncio.to_thread(self.load, block, block + 1)
                span = loaded if span is None else span.joined(loaded)
                await self.serve(span)
        print(f"SERVING blocks {start}:{end} of {cfg.model} as {self.p2p.peer_id}", flush=True)

    async def back_off(self) -> int | None:
        """With our claim (the span we just announced moving to) on the DHT, where to go instead because another
        server claimed our gap as well (`block_selection.back_off`); None to keep it."""
        num_blocks = self.model_config.num_hidden_layers
        try:
            return block_selection.back_off(await self.visible_servers(), num_blocks, self.server_info(self.state),
                                            self.sizes)
        except Exception as e:  # a DHT hiccup: keep the claim, the periodic checks correct it
            logger.warning(f"could not read the swarm to check our claim: {e}")
            return None

    async def anticipated_throughputs(self) -> np.ndarray:
        """`block_selection.anticipated_throughputs` of the swarm as the DHT shows it (zeros if it does not answer)."""
        num_blocks = self.model_config.num_hidden_layers
        try:
            return block_selection.anticipated_throughputs(await self.visible_servers(), num_blocks)
        except Exception as e:  # only the order of loading depends on it
            logger.warning(f"could not read the swarm: {e}")
            return np.zeros(num_blocks)

    async def serve(self, span: SpanModel) -> None:
        """Serve `span` (all or part of our blocks) from now on, and say so."""
        if self.servicer is None:
            cfg = self.config
            info = dict(model=cfg.model, start=span.start, end=span.end, dtype=str(span.compute_dtype),
                        quant=cfg.quant, version=__version__, peer_id=str(self.p2p.peer_id))
            budget = CacheBudget(self.cache_bytes, cfg.handler.evict_idle_after)
            self.servicer = BlockServicer(span, self.executor, budget, cfg.handler, info,
                                          adapters=self.adapters, membership=cfg.network.membership)
            await self.servicer.add_p2p_handlers(self.p2p)
        else:
            self.servicer.serve(span)
        self.state = "online"
        await self.announce("online")

    def cache_budget(self, free_before: int) -> int:
        """The KV budget of --cache-mb auto: what the loaded blocks left of free memory."""
        cfg = self.config
        gc.collect()
        cache_bytes = throughput.auto_cache_bytes(free_before, throughput.free_bytes(cfg.device))
        if cache_bytes <= 0:
            raise RuntimeError(f"No memory left on {cfg.device} for a KV cache after loading blocks "
                               f"{self.blocks[0]}:{self.blocks[1]}: serve fewer blocks, or give --cache-mb")
        logger.info(f"KV cache budget: {cache_bytes >> 20} MiB (auto)")
        return cache_bytes

    async def visible_servers(self) -> list[ServerInfo]:
        """The servers online or loading a span they announced, as the DHT shows them now."""
        servers = await fetch_swarm(self.dht, self.prefix, self.model_config.num_hidden_layers)
        return [s for s in servers if s.state != "offline"]

    async def choose_blocks(self) -> tuple[int, int]:
        """The span our memory holds that most raises the swarm's weakest blocks (in a small swarm, as planned).

        Where blocks differ in size, how many it holds depends on where it starts (`block_selection.span_ends`).
        """
        cfg = self.config
        self.capacity = float(cfg.num_blocks or throughput.capacity_that_fits(
            self.model_config, parse_dtype(cfg.dtype), cfg.device, cfg.quant, cfg.cache_bytes))
        if self.capacity < min(self.sizes or (1.0,)):
            cache = "its KV cache" if cfg.cache_bytes is None else f"{cfg.cache_bytes >> 20} MiB of KV cache"
            raise RuntimeError(f"Not enough free memory on {cfg.device} for one block of {cfg.model} besides "
                               f"{cache}: free some, or give --num-blocks")
        me = ServerInfo(str(self.p2p.peer_id), 0, self.span_end(0), "joining", capacity=self.capacity,
                        throughput=cfg.throughput or self.speed.forward)
        start = block_selection.join_start(await self.visible_servers(), self.model_config.num_hidden_layers, me,
                                           random.Random(), self.sizes)
        return start, self.span_end(start)

    def span_end(self, start: int) -> int:
        """Where our span ends if it starts at `start`: as many blocks as our memory holds there."""
        if self.capacity is None:  # a span given (--blocks): it never moves
            return start + self.blocks[1] - self.blocks[0]
        return block_selection.span_end(self.capacity, start, self.model_config.num_hidden_layers, self.sizes)

    async def balance_forever(self) -> None:
        """Now and then (jittered, so servers do not move in lockstep) move if another span serves markedly better.

        In a small swarm also soon after the layout changes (`block_selection.layout`): a server that
        moved, or one that found a crashed server and moved to cover its blocks, changes the plan for all;
        so does a report of servers found dead (`report_unreachable`). In a swarm of up to MAX_PROBES
        servers every poll pings the others, so that a crash is found within a poll rather than at the
        next periodic check (of whichever server comes first) and its report.
        """
        cfg, num_blocks = self.config, self.model_config.num_hidden_layers
        due, seen, small = time.monotonic() + cfg.balance_period * random.uniform(0.5, 1.5), None, False
        while not self.stop_event.is_set():
            wait = due - time.monotonic()
            await asyncio.sleep(max(0.0, min(wait, cfg.poll_period) if small else wait))
            periodic = time.monotonic() >= due
            if periodic:
                due = time.monotonic() + cfg.balance_period * random.uniform(0.5, 1.5)
            try:
                servers, reported = await asyncio.gather(self.visible_servers(),
                                                         fetch_unreachable(self.dht, self.prefix))
            except Exception as e:  # a DHT hiccup: keep serving, look again next time
                logger.warning(f"could not read the swarm to rebalance: {e}")
                continue
            reported &= {s.peer_id for s in servers}  # reports of servers gone from the DHT change nothing
            layout = block_selection.layout(servers), reported
            small = len(servers) <= block_selection.PLAN_MAX_SERVERS
            unchanged = not periodic and layout == seen
            probe = len(servers) <= block_selection.MAX_PROBES  # each poll pings all: a crash is found within one
            if unchanged and not probe:
                continue
            servers, dead = await self.without_dead(servers, reported)
            if unchanged and not dead - reported:
                continue
            seen = layout
            if dead - reported:
                await self.report_unreachable(dead)
            start = await asyncio.to_thread(  # up to 0.2 s of planning in a swarm of 60: not on the event loop
                block_selection.should_move, servers, num_blocks, self.server_info(self.state), sizes=self.sizes)
            if start is not None:
                try:
                    await self.move(start)
                except Exception:  # without a span there is nothing to serve: exit, to be restarted
                    logger.exception("moving to another span failed")
                    self.stop_event.set()

    async def without_dead(self, servers: list[ServerInfo],
                           reported: frozenset[str]) -> tuple[list[ServerInfo], frozenset[str]]:
        """`servers` less those of the suspects (servers reported unreachable, or of thinly held blocks) that do
        not answer a ping; and those.

        A crashed server's announcement lingers until it expires; planning around it would leave its
        blocks unserved that long. A record found dead once is not pinged again (each ping of a dead
        server waits out PING_TIMEOUT, and in a small swarm every poll checks every server). A live
        server refreshes its record every update period, and a new record is pinged again.
        """
        me = str(self.p2p.peer_id)
        token = self.config.network.membership.token(me)
        num_blocks = self.model_config.num_hidden_layers
        suspects = [s for s in block_selection.suspects(servers, num_blocks, reported) if s.peer_id != me]

        async def answers(peer_id: str) -> bool:
            try:
                await transport.call(self.p2p, peer_id, "info", wire.pack({}), PING_TIMEOUT, token=token)
                return True
            except transport.ServerRejected:  # a refusal (say, for our rate) is an answer
                return True
            except transport.ServerFailure:
                return False

        known = {s.peer_id for s in suspects if self.found_dead.get(s.peer_id) == s.expires}
        pinged = [s for s in suspects if s.peer_id not in known]
        alive = await asyncio.gather(*(answers(s.peer_id) for s in pinged))
        found = {s.peer_id for s, ok in zip(pinged, alive) if not ok}
        if found:
            logger.info(f"not counting {len(found)} announced servers that do not answer: {', '.join(sorted(found))}")
        dead = frozenset(known | found)
        self.found_dead = {s.peer_id: s.expires for s in suspects if s.peer_id in dead}
        return [s for s in servers if s.peer_id not in dead], dead

    async def report_unreachable(self, dead: frozenset[str]) -> None:
        """Say on the DHT which announced servers do not answer us, for as long as their records may linger.

        The server that should cover their blocks may be another, whose periodic check is seconds away;
        a report changes what its next poll reads, so it plans (and checks them) at once.
        """
        try:
            await self.dht.store(records.unreachable_key(self.prefix), sorted(dead)[:records.MAX_REPORTED],
                                 expiration_time=get_dht_time() + self.config.expiration,
                                 subkey=str(self.p2p.peer_id))
        except Exception as e:  # only others' reaction time depends on it
            logger.warning(f"could not report unreachable servers: {e}")

    async def move(self, start: int) -> None:
        """Move to the span at `start`: keep serving the blocks both spans share, load the others one by one.

        Once the move is announced, and before loading anything, give way where another server claimed
        the same gap meanwhile (`back_off`; again where the new claim collides in turn).
        """
        old_start, old_end = self.blocks
        kept = await self.claim(start)
        logger.info(f"moving from blocks {old_start}:{old_end} to {start}:{self.span_end(start)}, "
                    f"keeping {kept.end - kept.start if kept is not None else 0}")
        for _ in range(block_selection.BACK_OFF_ROUNDS):  # each read once our latest claim is on the DHT
            elsewhere = await self.back_off()
            if elsewhere is None:
                break
            logger.info(f"another server is loading blocks of our gap as well: taking {elsewhere}:"
                        f"{self.span_end(elsewhere)} instead")
            kept = await self.claim(elsewhere)
        gc.collect()
        if torch.device(self.config.device).type == "cuda":
            torch.cuda.empty_cache()
        await self.load_blocks(kept)

    async def claim(self, start: int) -> SpanModel | None:
        """Hold the span at `start` from now on, and say so. Of our blocks, keep serving those it shares (returned);
        with none, withdraw (offline, so clients route elsewhere) and announce the span as loading ("joining")."""
        end = self.span_end(start)
        served = range(self.servicer.span.start, self.servicer.span.end) if self.servicer is not None else range(0)
        kept = block_selection.kept_blocks(served, start, end - start)
        if len(kept):
            self.blocks = (start, end)
            await self.serve(self.servicer.span.part(kept.start, kept.stop))
            return self.servicer.span
        if self.servicer is not None:
            self.state = "offline"
            await self.announce("offline")
            await self.servicer.remove_p2p_handlers(self.p2p)
            self.servicer = None
        self.blocks = (start, end)
        self.state = "joining"
        await self.announce("joining")
        return None

    async def shutdown(self) -> None:
        logger.info("shutting down: withdrawing the announcement")
        try:
            if self.blocks is not None:
                await asyncio.wait_for(self.announce("offline"), 5)
        except Exception as e:  # the swarm may already be gone; exiting cleanly matters more
            logger.warning(f"could not withdraw the announcement: {e}")
        if self.dht is not None:
            await asyncio.wait_for(self.dht.shutdown(), 5)
        if self.p2p is not None:
            await stop_p2p(self.p2p)
        if self.executor is not None:
            self.executor.shutdown()
