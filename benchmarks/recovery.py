"""Recovery: what a server dying costs a generation step and a training step, against normal steps of the same run.

The loopback swarms get spare servers for blocks 2:4, one per kill; whichever of them the client
is using is SIGKILLed (with its libp2p daemon, as if its machine died), so every round starts
with a spare to recover on. Generation: the kill happens between two tokens inside `generate()`;
the figure is the wall time of the next step, beside a normal step, with the session's own
recovery delay (`InferenceSession.recoveries`); the tokens must equal the local model's.
Training (LoRA step on the wide model): the kill happens between forward and backward, or just
before the step (the client's view of the swarm still lists the dead server).

    python -m benchmarks.recovery [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

import itertools
import time

import torch

from benchmarks.common import (
    BACKUP,
    Bench,
    Figure,
    figures_table,
    local_model,
    median,
    run_section,
    seed_everything,
    timed_figure,
    token_ids,
)
from benchmarks.inference import timed_generate
from benchmarks.serving import attach_client_lora, freeze
from swarmtune.local_swarm import LocalSwarm, ServerProcess

SECTION = "recovery"


def add_spares(swarm: LocalSwarm, client, throughputs: list[float]) -> dict[str, ServerProcess]:
    """Start a server for BACKUP per throughput, all at once; returns every server of the swarm by peer id
    once the client's view of the swarm has the new ones."""
    started = [swarm.add_server(BACKUP, wait=False, throughput=t) for t in throughputs]
    spares = {}
    for server in started:  # "SERVING blocks A:B of MODEL as PEER"
        line = server.wait_marker("SERVING", swarm.start_timeout, f"a spare server for blocks {BACKUP}")[0]
        spares[line.rsplit(" ", 1)[-1]] = server
    deadline = time.monotonic() + 60
    while any(peer not in client.connection.view.servers for peer in spares):
        if time.monotonic() > deadline:
            raise TimeoutError(f"spare servers for blocks {BACKUP} never showed up in the DHT")
        time.sleep(0.2)
        client.connection.refresh()
    return {**{s.peer_id: s for s in swarm.servers if s.peer_id}, **spares}


def generation_figures(bench: Bench) -> list[Figure]:
    plan = bench.plan
    path = bench.model(plan.latency_hidden)
    swarm, client, local = bench.swarm(path), bench.client(path), local_model(path)
    ids = token_ids(client.config.vocab_size, 1, plan.prompt)
    kill_at = max(1, plan.new_tokens // 2)
    length = plan.prompt + plan.new_tokens
    expected = timed_generate(local, ids, plan.new_tokens)[2]
    normal, local_steps, killed, recoveries, identical = [], [], [], [], True
    servers = add_spares(swarm, client, [1.0] * plan.kills)
    for _ in range(plan.kills):
        local_steps.append(median(timed_generate(local, ids, plan.new_tokens)[1]))
        normal.append(median(timed_generate(client, ids, plan.new_tokens)[1]))
        with client.inference_session(length) as session:
            def kill(token: int, session=session) -> None:
                if token == kill_at:
                    hop = next(s.hop for s in session.spans if s.hop.start <= BACKUP[0] < s.hop.end)
                    servers[hop.peer_id].kill()

            _, steps, out = timed_generate(client, ids, plan.new_tokens, on_token=kill)
            killed.append(steps[kill_at - 1])
            recoveries.append(session.recoveries[-1] if session.recoveries else float("nan"))
        identical &= torch.equal(out, expected)
    return [timed_figure(
        SECTION, "generation step in which a server died", "ms", killed, normal, baseline_name="normal swarm step",
        note=f"recovery {1e3 * median(recoveries):.0f} ms (InferenceSession.recoveries), {plan.kills} kills; "
             f"tokens identical to local: {'yes' if identical else 'NO'}; "
             f"local step {1e3 * median(local_steps):.2f} ms")]


def training_figures(bench: Bench) -> list[Figure]:
    plan = bench.plan
    path = bench.model(plan.wide_hidden)
    swarm = bench.swarm(path)
    # deterministic routing: the live server with the highest announced throughput is chosen
    client = bench.client(path, routing_randomness=0.0, request_timeout=30.0)
    freeze(client)
    params = attach_client_lora(client, plan.lora_rank)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = token_ids(client.config.vocab_size, *plan.train_shape)
    replayer = client.remote.replayer
    killed: dict[str, list[float]] = {"between forward and backward": [], "just before the step": []}
    servers = add_spares(swarm, client, [10.0 + i for i in range(len(killed) * plan.kills)])

    def victim() -> ServerProcess:
        hop = next(h for h in replayer.last_route if h.start <= BACKUP[0] < h.end)
        return servers[hop.peer_id]

    def step(kill_between: bool = False) -> float:
        """Wall time of one LoRA step, not counting the kill itself."""
        began = time.perf_counter()
        loss = client(input_ids=ids, labels=ids).loss
        paused = 0.0
        if kill_between:
            t = time.perf_counter()
            victim().kill()
            paused = time.perf_counter() - t
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began - paused

    normal: list[float] = []
    failures_before, retried = replayer.stats.failures, 0
    try:
        for _, (case, samples) in itertools.product(range(plan.kills), killed.items()):
            for i in range(plan.warmup + 2):
                before = replayer.stats.failures
                took = step()
                if replayer.stats.failures > before:
                    retried += 1   # a dead server's DHT record outlives it; such steps are not normal
                elif i >= plan.warmup:
                    normal.append(took)
            if case == "just before the step":
                victim().kill()
                samples.append(step())
            else:
                samples.append(step(kill_between=True))
    finally:
        client.lora = None
    failures = replayer.stats.failures - failures_before
    if not normal:
        raise RuntimeError("every normal training step met a dead server: no baseline")
    base = median(normal)
    return [timed_figure(SECTION, f"LoRA training step, server killed {case}", "s", samples, normal,
                         baseline_name="normal swarm step",
                         note=f"extra {median(samples) - base:+.2f} s; {plan.kills} kills; {failures} failed requests "
                              f"for {2 * plan.kills} kills in all, {retried} other steps retried a dead server")
            for case, samples in killed.items()]


def run(bench: Bench) -> list[Figure]:
    seed_everything()
    return generation_figures(bench) + training_figures(bench)


def main(argv: list[str] | None = None) -> None:
    run_section(run, figures_table, __doc__, "recovery", argv)


if __name__ == "__main__":
    main()
