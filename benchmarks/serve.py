"""Serving over the OpenAI API: concurrent streaming clients of `python -m swarmtune.serve` against a lone one.

The app is the one `swarmtune.serve.build` makes from the Hydra config (as the command does), served
by uvicorn in a thread on 127.0.0.1 over the run's 3-server loopback swarm. 1, 4 and 16 clients
(1 and 4 in --smoke) each stream /v1/completions at once (temperature 0, a fixed max_tokens, each
its own prompt); per scenario: aggregate tokens/s, time to first token and p50/p99 inter-token
latency, each against the lone client measured in the same run, scenarios interleaved. The
batcher's steps show that the clients shared decoding steps (tokens per step > 1).
Targets: 16-client aggregate tokens/s >= 6x the lone client's; 16-client p99 inter-token latency <= 3x.

    python -m benchmarks.serve [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field

import httpx

from benchmarks.common import Bench, Figure, figures_table, median, parse_args, single_threaded
from swarmtune import shutdown

SECTION = "serve"
SCENARIOS = {"smoke": (1, 4), "quick": (1, 4, 16), "full": (1, 4, 16)}
THROUGHPUT_TARGET, P99_TARGET = 6.0, 3.0
WORDS = ("bees", "honey", "flowers", "nectar", "the", "quick", "brown", "fox", "lazy", "dog", "why", "answer",
         "question", "garden", "summer", "hive", "queen", "wax", "pollen", "meadow")
REQUEST_TIMEOUT_S = 120.0


def prompt(i: int) -> str:
    """Client i's prompt: its own words, 4 to 11 of them."""
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(4 + i % 8))


@dataclass
class Round:
    """One scenario run once: every client's token arrival times, and the batcher steps it took."""

    clients: int
    wall: float = 0.0
    tokens: int = 0
    steps: int = 0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)


async def stream_one(http: httpx.AsyncClient, url: str, model: str, text: str, max_tokens: int) -> tuple:
    """(time to first token, gaps between the following chunks, completion tokens) of one streamed completion."""
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    began, arrivals, tokens = time.perf_counter(), [], None
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"the server failed a request: {event['error']}")
            if event.get("choices") and event["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if not arrivals:
        raise RuntimeError("a stream brought no text")
    return arrivals[0] - began, [b - a for a, b in zip(arrivals, arrivals[1:])], tokens or len(arrivals)


def run_round(url: str, engine, model: str, clients: int, max_tokens: int) -> Round:
    """`clients` streams at once, from one event loop; every request is bounded by REQUEST_TIMEOUT_S."""
    async def all_of_them() -> list[tuple]:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
            return await asyncio.wait_for(
                asyncio.gather(*[stream_one(http, url, model, prompt(i), max_tokens) for i in range(clients)]),
                REQUEST_TIMEOUT_S + 10)

    batcher = engine.batchers.get(model)
    steps_before = batcher.steps if batcher is not None else 0
    began = time.perf_counter()
    results = asyncio.run(all_of_them())
    out = Round(clients, wall=time.perf_counter() - began)
    out.steps = engine.batchers[model].steps - steps_before
    for ttft, gaps, tokens in results:
        out.ttft.append(ttft)
        out.gaps += gaps
        out.tokens += tokens
    return out


@contextlib.contextmanager
def served(bench: Bench, path: str, max_rows: int):
    """(base url, engine) of the OpenAI app over the run's loopback swarm; uvicorn stops on exit.

    The batcher never shrinks its session, so each scenario gets an app of its own with `max_rows` = its
    clients: the lone client's steps carry one row, not the 16 a shared app would have grown to."""
    import uvicorn

    from swarmtune import launch, serve

    swarm = bench.swarm(path)
    overrides = [f"model.path={path}", f"swarm.initial_peers=[{','.join(swarm.initial_peers)}]",
                 f"batching.max_rows={max_rows}", "batching.max_length=1024"]
    with launch.composed("serve", overrides) as composed:
        cfg = composed   # composed and left: Hydra allows one composition at a time, and every scenario has one
    with contextlib.ExitStack() as stack:
        app, engine = serve.build(stack, cfg)
        sock = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()

        def stop() -> None:
            server.should_exit = True
            thread.join(15)

        stack.callback(stop)
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        if not server.started:
            raise RuntimeError("uvicorn did not start within 30 s")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between samples."""
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[round(q) - 1] if 1 <= q <= 99 else \
        (min(xs) if q < 1 else max(xs))


def rel_iqr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return (q[2] - q[0]) / statistics.median(xs)


def figures_from(rounds: dict[int, list[Round]], max_tokens: int) -> list[Figure]:
    """Per scenario: aggregate tokens/s, TTFT, p50 and p99 inter-token latency, each against the lone client."""
    def summary(rs: list[Round]) -> dict:
        rates = [r.tokens / r.wall for r in rs]
        gaps = [g for r in rs for g in r.gaps]
        ttft = [t for r in rs for t in r.ttft]
        tokens, steps = sum(r.tokens for r in rs), sum(r.steps for r in rs)
        return {"rate": median(rates), "best_rate": max(rates), "rate_noise": rel_iqr(rates),
                "ttft": 1e3 * median(ttft), "p50": 1e3 * percentile(gaps, 50), "p99": 1e3 * percentile(gaps, 99),
                "steps": steps, "tokens": tokens, "tokens_per_step": tokens / max(steps, 1),
                "steps_per_round": [r.steps for r in rs], "gaps": len(gaps), "rounds": len(rs)}

    stats = {n: summary(rs) for n, rs in rounds.items()}
    lone, top = stats[1], max(stats)
    figures = []
    for n, s in stats.items():
        details = {k: v for k, v in s.items()} | {"clients": n, "max_tokens": max_tokens}
        base = None if n == 1 else lone
        share = f"batcher: {s['steps']} steps for {s['tokens']} tokens ({s['tokens_per_step']:.1f} tokens/step)"
        rate_note, p99_note = share, ""
        if n == 16:
            ratio = s["rate"] / lone["rate"]
            rate_note += f"; {'meets' if ratio >= THROUGHPUT_TARGET else 'misses'} the target >= {THROUGHPUT_TARGET:g}x"
            p99 = s["p99"] / lone["p99"]
            p99_note = f"{'meets' if p99 <= P99_TARGET else 'misses'} the target <= {P99_TARGET:g}x"
        elif n == top and n > 1:
            rate_note += "; the targets are set for 16 clients (not run in this mode)"
        tag = f"{n} client{'s' if n > 1 else ''}"
        figures += [
            Figure(SECTION, f"aggregate tokens/s, {tag}", "tokens/s", s["rate"], base and base["rate"], "1 client",
                   max(s["rate_noise"], lone["rate_noise"]), rate_note,
                   (s["best_rate"] / lone["best_rate"]) if base else None, details),
            Figure(SECTION, f"time to first token, {tag}", "ms", s["ttft"], base and base["ttft"], "1 client",
                   details=details),
            Figure(SECTION, f"p50 inter-token latency, {tag}", "ms", s["p50"], base and base["p50"], "1 client",
                   details=details),
            Figure(SECTION, f"p99 inter-token latency, {tag}", "ms", s["p99"], base and base["p99"], "1 client",
                   note=p99_note, details=details),
        ]
    return figures


def run(bench: Bench) -> list[Figure]:
    plan = bench.plan
    path = bench.model(plan.latency_hidden)
    scenarios, max_tokens = SCENARIOS[plan.name], plan.new_tokens
    rounds: dict[int, list[Round]] = {n: [] for n in scenarios}
    with contextlib.ExitStack() as stack:
        apps = {n: stack.enter_context(served(bench, path, n)) for n in scenarios}
        for i in range(plan.warmup + plan.repeats):
            for n, (url, engine) in apps.items():   # interleaved: every scenario sees the same background load
                r = run_round(url, engine, engine.base_name, n, max_tokens)
                if i >= plan.warmup:
                    rounds[n].append(r)
    return figures_from(rounds, max_tokens)


def panels(figures: list[Figure]) -> list[tuple]:
    """One panel per figure kind, one bar pair (1 client, N clients) per scenario of more than one client."""
    out = []
    for kind, unit in (("aggregate tokens/s", "tokens/s"), ("time to first token", "TTFT ms"),
                       ("p50 inter-token latency", "p50 ITL ms"), ("p99 inter-token latency", "p99 ITL ms")):
        chosen = [f for f in figures if f.name.startswith(kind) and f.baseline]
        if chosen:
            out.append((unit, [f.name.split(", ")[-1] for f in chosen], [f.baseline for f in chosen],
                        [f.swarm for f in chosen], "1 client"))
    return out


def main(argv: list[str] | None = None) -> None:
    from benchmarks.run import plot_panels

    args = parse_args(__doc__, f"benchmarks/results/{SECTION}", argv)
    with shutdown.stopped_by_signals(), single_threaded(), Bench(args.plan, args.out) as bench:
        figures = run(bench)
    print(figures_table(figures))
    plot_panels(panels(figures), os.path.join(args.out, f"plot_{SECTION}.png"),
                f"{SECTION}: N concurrent streaming clients vs 1 client, same run")


if __name__ == "__main__":
    main()
