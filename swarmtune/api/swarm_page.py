"""The live swarm page: which servers hold which blocks of the served model, and which blocks nobody holds.

A server that dies without a word (SIGKILL, a machine gone) keeps an "online" record on the DHT until
it expires, so coverage read from records alone would hide the gap for the whole expiration period.
A monitor on the connection's event loop therefore re-reads the records and pings every server with a
short info RPC twice per page refresh; a server whose latest ping failed is shown unreachable and
does not count as covering its blocks. The monitor only observes: it leaves the connection's view,
round trips and bans to the client's own routing.

The page arrives with the current state already in its HTML (a first paint, or a reader without
JavaScript, sees data), then refreshes itself from /api/swarm. No served field names a local path:
a model announced by its checkpoint's directory is shown by the directory's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from importlib import resources

import fastapi
from fastapi.responses import HTMLResponse
from hivemind.utils import get_dht_time

from swarmtune import transport, wire
from swarmtune.client.connection import MAX_PINGS, PING_TIMEOUT, SwarmConnection
from swarmtune.directory import SwarmView, fetch_models, fetch_swarm
from swarmtune.records import ModelInfo, ServerInfo
from swarmtune.status import uncovered

logger = logging.getLogger(__name__)

MIN_PERIOD = 0.5      # seconds: the fastest the monitor re-reads and pings, whatever the page asks
MODELS_PERIOD = 10.0  # seconds between reads of every model announced (they change rarely)
STOP_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True)
class Health:
    """The latest ping of one server."""

    reachable: bool
    rtt: float | None       # seconds, when it answered
    checked: float          # time.monotonic() of the ping
    error: str = ""


class SwarmMonitor:
    """Re-reads the model's records and pings its servers every `period` seconds, on the connection's loop.

    Each round publishes new objects (never mutates published ones), so the page reads them from
    another thread without locks. Every wait is bounded: a ping by `ping_timeout`, a read by its timeout.
    """

    def __init__(self, connection: SwarmConnection, period: float, ping_timeout: float):
        self.connection, self.period, self.ping_timeout = connection, period, ping_timeout
        self.records: tuple[ServerInfo, ...] = tuple(connection.view.servers.values())
        self.health: dict[str, Health] = {}
        self.models: dict[str, ModelInfo] = {}
        self.checked: float | None = None  # time.monotonic() of the last completed round of pings
        self._models_read = float("-inf")
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the rounds on the connection's loop (idempotent; nothing once the connection is closed)."""
        if self.connection.loop.is_running() and (self._task is None or self._task.done()):
            await self._on_loop(self._spawn())

    async def stop(self) -> None:
        """Cancel the rounds and wait (bounded) until they ended; a closed connection has cancelled them."""
        if self._task is not None and self.connection.loop.is_running():
            with contextlib.suppress(Exception):
                await self._on_loop(self._cancel())
        self._task = None

    async def _on_loop(self, coro) -> None:
        future = asyncio.run_coroutine_threadsafe(coro, self.connection.loop)
        await asyncio.wait_for(asyncio.wrap_future(future), STOP_TIMEOUT)

    async def _spawn(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._watch())

    async def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=STOP_TIMEOUT)

    async def _watch(self) -> None:
        """Reads and pings in loops of their own: a slow DHT must not delay noticing a dead server."""
        await asyncio.gather(self._every(self._read_records), self._every(self._ping_all))

    async def _every(self, step) -> None:
        while True:
            began = time.monotonic()
            try:
                await step()
            except Exception as e:  # keep what was read last; the next round may succeed
                logger.debug(f"swarm page {step.__name__} failed: {e!r}")
            await asyncio.sleep(max(0.0, self.period - (time.monotonic() - began)))

    async def _read_records(self) -> None:
        c = self.connection
        timeout = max(self.period, c.config.request_timeout / 4)
        self.records = tuple(await asyncio.wait_for(fetch_swarm(c.dht, c.prefix, c.view.num_blocks), timeout))
        if time.monotonic() - self._models_read >= MODELS_PERIOD:
            self.models = await asyncio.wait_for(fetch_models(c.dht), timeout)
            self._models_read = time.monotonic()

    async def _ping_all(self) -> None:
        """Ping every server with a live record (from the previous read); forget servers whose record is gone."""
        peers = sorted({s.peer_id for s in self.records if s.state != "offline"})
        limit = asyncio.Semaphore(MAX_PINGS)
        results = await asyncio.gather(*(self._ping(peer, limit) for peer in peers))
        self.health = dict(zip(peers, results))
        self.checked = time.monotonic()

    async def _ping(self, peer_id: str, limit: asyncio.Semaphore) -> Health:
        """One info RPC, as the connection's own pings time it: a refusal is an answer, a failure is not."""
        async with limit:
            began = time.perf_counter()
            try:
                await transport.call(self.connection.p2p, peer_id, "info", wire.pack({}), self.ping_timeout,
                                     token=self.connection.token)
            except transport.ServerRejected:
                pass
            except transport.ServerFailure as e:
                return Health(False, None, time.monotonic(), e.reason)
            return Health(True, time.perf_counter() - began, time.monotonic())

    def snapshot(self, model_name: str, refresh_s: float) -> dict:
        """What /api/swarm returns (see `swarm_router`)."""
        c, records, health, models = self.connection, self.records, self.health, self.models
        num_blocks, now, dht_now = c.view.num_blocks, time.monotonic(), get_dht_time()
        counted = [s for s in records if s.state == "online" and getattr(health.get(s.peer_id), "reachable", True)]
        view = SwarmView(num_blocks, {s.peer_id: s for s in counted})
        blocks = []
        for block in range(num_blocks):
            here = sorted(view.covering(block), key=lambda s: s.peer_id)
            blocks.append({"block": block, "covered": bool(here), "count": len(here),
                           "servers": [s.peer_id for s in here], "throughput": sum(s.throughput for s in here)})
        servers = []
        for s in sorted(records, key=lambda s: (s.start, s.end, s.peer_id)):
            h = health.get(s.peer_id)
            rtt = c.rtts.get(s.peer_id)
            servers.append({
                "peer_id": s.peer_id, "start": s.start, "end": s.end, "state": s.state,
                "reachable": None if h is None else h.reachable, "covering": s.peer_id in view.servers,
                "ping_ms": None if h is None or h.rtt is None else h.rtt * 1000,
                "ping_age_s": None if h is None else now - h.checked, "ping_error": "" if h is None else h.error,
                "client_rtt_ms": None if rtt is None else rtt * 1000, "banned": c.bans.banned(s.peer_id, s.expires),
                "throughput": s.throughput, "inference_rps": s.inference_rps,
                "cache_tokens_left": s.cache_tokens_left, "version": s.version, "dtype": s.dtype,
                "quant": s.quant, "adapters": list(s.adapters), "addrs": list(s.addrs),
                "expires_in_s": s.expires - dht_now,
            })
        info = models.get(c.prefix)
        missing = uncovered(counted, num_blocks)
        return {
            "time": time.time(), "refresh_s": refresh_s,
            "checked_age_s": None if self.checked is None else now - self.checked,
            "model": {"name": model_name, "dht_prefix": c.prefix, "num_blocks": num_blocks,
                      "model_id": public_id(info.model_id) if info else None,
                      "model_type": info.model_type if info else None},
            "models": [{"dht_prefix": prefix, "num_blocks": m.num_blocks, "model_id": public_id(m.model_id),
                        "model_type": m.model_type} for prefix, m in models.items()],
            "covered": not missing, "uncovered_blocks": missing, "blocks": blocks, "servers": servers,
        }


HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def public_id(model_id: str) -> str:
    """A hub id as announced; a filesystem path (absolute, relative, or a directory here) by its last part."""
    if HUB_ID.fullmatch(model_id) and not model_id.startswith(".") and not os.path.exists(model_id):
        return model_id
    return os.path.basename(os.path.normpath(model_id.replace("\\", "/"))) or "?"


def _fixed(x: float | None, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def prerender(s: dict) -> dict[str, str]:
    """The page's parts as HTML, as its script's `render` makes them (every field escaped: peers wrote them)."""
    e = html.escape
    m = s["model"]
    reachable = sum(x["covering"] for x in s["servers"])
    counts = f"{reachable} of {len(s['servers'])} servers online and reachable"
    summary = (f"every block is served: {counts}" if s["covered"] else
               f"NO SERVER for block(s) {', '.join(map(str, s['uncovered_blocks']))}: {counts}")
    blocks = []
    for b in s["blocks"]:
        held = " ".join("..." + p[-8:] for p in b["servers"]) if b["covered"] else "NO SERVER"
        title = e(f"block {b['block']}: {held}")
        blocks.append(f'<div class="block" data-block="{b["block"]}" data-covered="{str(b["covered"]).lower()}" '
                      f'data-count="{b["count"]}" title="{title}"><b>{b["block"]}</b>'
                      f'<span>{b["count"] if b["covered"] else "none"}</span></div>')
    rows = []
    for x in s["servers"]:
        note = "ping: " + x["ping_error"] if x["ping_error"] else "banned by this client" if x["banned"] else ""
        reach = "?" if x["reachable"] is None else "yes" if x["reachable"] else "NO"
        cells = [(x["peer_id"], ""), (f'{x["start"]}:{x["end"]}', ""), (x["state"], ""), (reach, ""),
                 (_fixed(x["ping_ms"], 1), "num"), (_fixed(x["throughput"], 1), "num"),
                 (_fixed(x["inference_rps"], 1), "num"), (x["cache_tokens_left"], "num"), (x["dtype"], ""),
                 (x["quant"], ""), (", ".join(x["adapters"]), ""), (x["version"], ""), (note, "why")]
        tds = "".join(f'<td{f" class={q}" if q else ""} title="{e(str(v))}">{e(str(v))}</td>' for v, q in cells)
        flag = {None: "null", True: "true", False: "false"}[x["reachable"]]
        rows.append(f'<tr data-peer="{e(x["peer_id"])}" data-reachable="{flag}" '
                    f'data-covering="{str(x["covering"]).lower()}">{tds}</tr>')
    others = [x for x in s["models"] if x["dht_prefix"] != m["dht_prefix"]]
    models = ("Also announced on this DHT: " + "; ".join(
        f'{x["model_id"]} ({x["dht_prefix"]}, {x["num_blocks"]} blocks)' for x in others)) if others else ""
    kind = f', {m["model_type"]}' if m["model_type"] else ""
    return {"__HEADING__": e(f'{m["name"]}: {m["num_blocks"]} blocks (DHT prefix {m["dht_prefix"]}{kind})'),
            "__SUMMARY__": e(summary), "__COVERED__": str(s["covered"]).lower(),
            "__UNCOVERED__": e(",".join(map(str, s["uncovered_blocks"]))), "__BLOCKS__": "".join(blocks),
            "__ROWS__": "".join(rows), "__MODELS__": e(models)}


def swarm_router(connection: SwarmConnection, model_name: str, refresh_s: float = 2.0) -> fastapi.APIRouter:
    """`GET /`: the swarm page, refreshing itself every `refresh_s` seconds; `GET /api/swarm`: what it shows.

    The monitor starts and stops with the app's lifespan (`app.include_router` merges the router's);
    should the app run without lifespan events, the first request starts it, and closing the
    connection cancels it. `router.monitor` is the monitor, for apps that want its data otherwise.
    """
    if not refresh_s > 0:
        raise ValueError(f"refresh_s must be > 0, got {refresh_s}")
    period = max(MIN_PERIOD, refresh_s / 2)  # a killed server's gap shows within about one page refresh
    monitor = SwarmMonitor(connection, period, ping_timeout=min(PING_TIMEOUT, max(1.0, refresh_s)))

    @contextlib.asynccontextmanager
    async def lifespan(_app) -> AsyncIterator[None]:
        await monitor.start()
        try:
            yield
        finally:
            await monitor.stop()

    router = fastapi.APIRouter(lifespan=lifespan)
    router.monitor = monitor
    page = resources.files("swarmtune.assets").joinpath("swarm.html").read_text()

    @router.get("/api/swarm", name="swarm_api")
    async def swarm_api() -> dict:
        await monitor.start()
        return monitor.snapshot(model_name, refresh_s)

    @router.get("/", response_class=HTMLResponse, name="swarm_page")
    async def swarm_page(request: fastapi.Request) -> HTMLResponse:
        await monitor.start()
        parts = {"__API_URL__": request.url_for("swarm_api").path, "__REFRESH_MS__": str(int(refresh_s * 1000)),
                 **prerender(monitor.snapshot(model_name, refresh_s))}
        return HTMLResponse(re.sub("|".join(parts), lambda match: parts[match.group(0)], page))

    return router
