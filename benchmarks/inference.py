"""Inference: steps/s and time to first token through a 3-server loopback swarm against the local model.

Also the per-hop overhead of a single-token step: (swarm step - in-process compute of the same
blocks) / hops, with the in-process figure from the very spans the servers run, in this process.
Target (issue 9): per-hop overhead <= 1.5 ms.

    python -m benchmarks.inference [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from benchmarks.common import (
    SPANS,
    Bench,
    Figure,
    Plan,
    figures_table,
    local_model,
    median,
    rpc_rtt,
    run_section,
    seed_everything,
    step_design,
    timed_figure,
    token_ids,
)
from swarmtune.local_swarm import LocalSwarm
from swarmtune.models import load_span

SECTION = "inference"
HOP_OVERHEAD_TARGET_MS = 1.5


class TokenClock(StoppingCriteria):
    """Notes when each new token is ready (transformers asks after every step); never stops generation."""

    def __init__(self, on_token: Callable[[int], None] | None = None):
        self.times: list[float] = []
        self.on_token = on_token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.on_token is not None:
            self.on_token(len(self.times) + 1)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def timed_generate(model, ids: torch.Tensor, new_tokens: int,
                   on_token: Callable[[int], None] | None = None) -> tuple[float, list[float], torch.Tensor]:
    """(time to first token, the step times after it, the tokens) of one greedy generation."""
    clock = TokenClock(on_token)
    began = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             stopping_criteria=StoppingCriteriaList([clock]))
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return clock.times[0] - began, steps, out


def generation_figures(local, client, plan: Plan, batch: int, section: str = SECTION) -> list[Figure]:
    """Time to first token and steps/s of greedy generation at `batch`, swarm vs local, interleaved."""
    ids = token_ids(local.config.vocab_size, batch, plan.prompt)
    samples: dict[str, dict[str, list[float]]] = {"local": {"ttft": [], "step": []}, "swarm": {"ttft": [], "step": []}}
    for i in range(plan.warmup + plan.repeats):
        for name, model in (("local", local), ("swarm", client)):
            ttft, steps, _ = timed_generate(model, ids, plan.new_tokens)
            if i >= plan.warmup:
                samples[name]["ttft"].append(ttft)
                samples[name]["step"].append(median(steps))
    loc, sw = samples["local"], samples["swarm"]
    return [
        timed_figure(section, f"time to first token, batch {batch} (prompt {plan.prompt})", "ms", sw["ttft"],
                     loc["ttft"]),
        timed_figure(section, f"inference steps/s, batch {batch}", "steps/s", sw["step"], loc["step"], amount=1.0,
                     note=f"{plan.new_tokens} new tokens, greedy; each sample is one generation's median step"),
    ]


def session_step_times(session_step: Callable[[torch.Tensor], object], hidden: int, plan: Plan) -> list[float]:
    """Times of single-token steps after a prompt-sized prefill, through whatever runs `session_step`."""
    torch.manual_seed(0)
    session_step(torch.randn(1, plan.prompt, hidden))
    token = torch.randn(1, 1, hidden)
    times = []
    for _ in range(plan.warmup + plan.session_steps):
        began = time.perf_counter()
        session_step(token)
        times.append(time.perf_counter() - began)
    return times[plan.warmup:]


def hop_overhead_figures(path: str, client, swarm: LocalSwarm, plan: Plan, section: str = SECTION) -> list[Figure]:
    """Single-token steps through the swarm's session vs the same spans run in this process."""
    spans = [load_span(path, start, end) for start, end in SPANS]
    hidden = spans[0].config.hidden_size
    max_length = plan.prompt + plan.warmup + plan.session_steps
    local_times, swarm_times = [], []
    for _ in range(max(1, plan.repeats // 2)):
        caches = [span.make_cache(1, max_length) for span in spans]

        def in_process(h: torch.Tensor, caches=caches) -> torch.Tensor:
            with torch.inference_mode():
                for span, cache in zip(spans, caches):
                    h = span(h, cache=cache)
            return h

        local_times += session_step_times(in_process, hidden, plan)
        with client.open_session(max_length) as session:
            swarm_times += session_step_times(session.step, hidden, plan)
            design = step_design(session, hidden)
    step = timed_figure(section, "single-token step through 3 spans, batch 1", "ms", swarm_times, local_times,
                        baseline_name="same spans in-process", note=f"steps {design}")
    hops = len(SPANS)
    per_hop = (step.swarm - step.baseline) / hops
    best = 1e3 * (min(swarm_times) - min(local_times)) / hops
    verdict = "meets" if per_hop <= HOP_OVERHEAD_TARGET_MS else "misses"
    return [step, Figure(
        section, "per-hop overhead per step", "ms", per_hop, None, noise=step.noise,
        note=f"(swarm - in-process) / {hops} hops, medians; {verdict} the target <= {HOP_OVERHEAD_TARGET_MS} ms; "
             f"from the fastest steps (least contention): {best:.2f} ms; libp2p's unary round trip (info RPC), "
             f"for scale: {1e3 * rpc_rtt(client, swarm):.2f} ms")]


def run(bench: Bench) -> list[Figure]:
    seed_everything()
    path = bench.model(bench.plan.latency_hidden)
    local, client = local_model(path), bench.client(path)
    figures = []
    for batch in bench.plan.batches:
        figures += generation_figures(local, client, bench.plan, batch)
    return figures + hop_overhead_figures(path, client, bench.swarm(path), bench.plan)


def main(argv: list[str] | None = None) -> None:
    run_section(run, figures_table, __doc__, "inference", argv)


if __name__ == "__main__":
    main()
