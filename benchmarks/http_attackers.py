"""Hostile HTTP clients of `python -m swarmtune.serve`, for benchmarks/hostile.py: each its own process.

    python -m benchmarks.http_attackers KIND --go-file PATH --duration S [--workers N]

It waits for --go-file (the endpoint's base URL, http://127.0.0.1:PORT), prints READY once under way,
a line `STATS {json}` every second (requests sent, the answers by status, connections opened and
closed by the server), and stops by itself after --duration seconds. Every network wait is bounded.

Kinds (each worker loops until the deadline):
- queue_flood: as many sequences as a client may have (2 prompts x n 4), 2,000 tokens each, non-streaming,
  hanging up after 1 s; one in four asks for 64 prompts x n 16 (the issue's request), refused outright
- stop_bomb: 4 stop sequences of 120,000 characters (refused), then 4 of 256 with 200 tokens (allowed)
- body_bomb: an 8 MB prompt, with its Content-Length, then the same chunked (no length)
- slow_headers: a connection that sends a header line a second and never ends its headers; a new one when closed
- streams: streaming requests of 2,000 tokens that read two events and hang up
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

GO_TIMEOUT = 120.0
MODEL_TIMEOUT = 10.0


@dataclass
class Attack:
    kind: str
    url: str
    model: str
    deadline: float
    stats: Counter = field(default_factory=Counter)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def answered(self, status: int | str) -> None:
        self.stats[f"status {status}"] += 1
        self.ready.set()


def completion(attack: Attack, **body) -> dict:
    return {"model": attack.model, "prompt": "Bees", "temperature": 1, **body}


async def queue_flood(attack: Attack, client: httpx.AsyncClient, i: int) -> None:
    big = i % 4 == 3
    body = completion(attack, prompt=["Bees"] * (64 if big else 2), n=16 if big else 4, max_tokens=2000)
    attack.stats["sent"] += 1
    try:
        r = await client.post(f"{attack.url}/v1/completions", json=body, timeout=min(1.0, attack.left() + 0.01))
        attack.answered(r.status_code)
    except httpx.TimeoutException:  # hangs up, its sequences still queued or running
        attack.answered("hung up")
        attack.ready.set()


async def stop_bomb(attack: Attack, client: httpx.AsyncClient, i: int) -> None:
    body = completion(attack, stop=[chr(97 + k) * 120_000 for k in range(4)], max_tokens=20) if i % 2 else \
        completion(attack, stop=[chr(97 + k) * 256 for k in range(4)], max_tokens=200)
    attack.stats["sent"] += 1
    with contextlib.suppress(httpx.TimeoutException):
        r = await client.post(f"{attack.url}/v1/completions", json=body, timeout=60)
        attack.answered(r.status_code)


BODY = json.dumps({"model": "", "prompt": "bee " * 2_000_000}).encode()  # 8 MB


async def body_bomb(attack: Attack, client: httpx.AsyncClient, i: int) -> None:
    async def chunked():
        for k in range(0, len(BODY), 1 << 16):
            yield BODY[k:k + (1 << 16)]

    attack.stats["sent"] += 1
    content = chunked() if i % 2 else BODY
    try:
        r = await client.post(f"{attack.url}/v1/completions", content=content, timeout=60,
                              headers={"content-type": "application/json"})
        attack.answered(r.status_code)
    except httpx.TransportError as e:  # the server closed on us mid-body
        attack.answered(type(e).__name__)


async def slow_headers(attack: Attack, client: httpx.AsyncClient, i: int) -> None:
    host, port = attack.url.removeprefix("http://").rsplit(":", 1)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), MODEL_TIMEOUT)
    except (OSError, TimeoutError):
        attack.answered("refused")
        await asyncio.sleep(0.1)
        return
    attack.stats["opened"] += 1
    attack.ready.set()
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        while attack.running():
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                    attack.stats["closed by the server"] += 1
                    return
    except OSError:
        attack.stats["closed by the server"] += 1
    finally:
        writer.close()


async def streams(attack: Attack, client: httpx.AsyncClient, i: int) -> None:
    body = completion(attack, max_tokens=2000, stream=True)
    attack.stats["sent"] += 1
    try:
        async with client.stream("POST", f"{attack.url}/v1/completions", json=body, timeout=30) as r:
            attack.answered(r.status_code)
            events = 0
            async for line in r.aiter_lines():
                events += bool(line)
                if events >= 2:
                    break
    except httpx.TransportError as e:
        attack.answered(type(e).__name__)


KINDS: dict[str, Callable[[Attack, httpx.AsyncClient, int], Awaitable[None]]] = {
    "queue_flood": queue_flood, "stop_bomb": stop_bomb, "body_bomb": body_bomb, "slow_headers": slow_headers,
    "streams": streams}


async def worker(attack: Attack, client: httpx.AsyncClient, index: int) -> None:
    for i in range(10**9):
        if not attack.running():
            return
        try:
            await KINDS[attack.kind](attack, client, index + i)
        except Exception as e:  # count it and go on: the attack is what matters, not our own hiccups
            attack.stats[f"error {type(e).__name__}"] += 1
            await asyncio.sleep(0.1)


async def report(attack: Attack) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(attack.ready.wait(), attack.left())
    if attack.ready.is_set():
        print(f"READY {attack.kind}", flush=True)
    while attack.running():
        print("STATS " + json.dumps(attack.stats), flush=True)
        await asyncio.sleep(min(1.0, attack.left() + 0.01))


async def main_async(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + GO_TIMEOUT
    while not os.path.exists(args.go_file):
        if time.monotonic() > deadline:
            raise SystemExit(f"no {args.go_file} within {GO_TIMEOUT:.0f} s")
        await asyncio.sleep(0.05)
    with open(args.go_file) as f:
        url = f.read().strip()
    limits = httpx.Limits(max_connections=args.workers + 8, max_keepalive_connections=args.workers + 8)
    async with httpx.AsyncClient(limits=limits) as client:
        models = await client.get(f"{url}/v1/models", timeout=MODEL_TIMEOUT)
        attack = Attack(args.kind, url, models.json()["data"][0]["id"], time.monotonic() + args.duration)
        reporter = asyncio.create_task(report(attack))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(worker(attack, client, i)
                                                    for i in range(args.workers))), args.duration + 5)
        attack.deadline = 0.0
        await asyncio.wait_for(reporter, 5)
        print("STATS " + json.dumps(attack.stats), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("kind", choices=sorted(KINDS))
    p.add_argument("--go-file", required=True, help="wait for this file, then attack the URL written in it")
    p.add_argument("--duration", type=float, required=True, help="seconds of attack, then exit")
    p.add_argument("--workers", type=int, default=1, help="requests or connections in flight at once")
    asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    main()
