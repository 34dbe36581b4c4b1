"""/metrics in Prometheus' text format: what the endpoint is doing, and whether the swarm serves its model.

Counters and histograms are updated as tokens come (from the batching threads; prometheus_client
is thread-safe); the gauges are read from the engine when scraped. Each app has a registry of its
own, so that several apps in one process (tests) do not share figures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("swarmtune_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("swarmtune_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("swarmtune_time_to_first_token_seconds", "From admission to a sequence's first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("swarmtune_inter_token_latency_seconds", "Between a sequence's successive tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("swarmtune_requests_rejected", "Requests refused by a limit, by HTTP status",
                                ["status"], registry=r)
        r.register(_EngineState(engine))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineState:
    """Gauges read from the engine at each scrape."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []

    def collect(self):
        engine = self.engine
        in_rows = {id(s) for b in list(engine.batchers.values()) for s in list(b.rows) if s is not None}
        replies = list(engine.replies)
        running = sum(any(id(s) in in_rows for s in r.sequences) for r in replies)
        yield _gauge("swarmtune_requests_running", "Requests with a sequence in a batch row", running)
        yield _gauge("swarmtune_requests_waiting", "Admitted requests with no sequence in a row yet",
                     len(replies) - running)
        yield _gauge("swarmtune_rows_in_use", "Batch rows decoding a sequence", len(in_rows))
        yield _gauge("swarmtune_rows", "Rows of the open batched sessions",
                     sum(len(b.rows) for b in list(engine.batchers.values())))
        view = engine.connection.view
        missing = view.uncovered(0, view.num_blocks, engine.connection.bans)
        yield _gauge("swarmtune_swarm_blocks", "Blocks of the served model", view.num_blocks)
        yield _gauge("swarmtune_swarm_blocks_covered", "Blocks some reachable server holds",
                     view.num_blocks - len(missing))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
