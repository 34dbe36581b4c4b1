"""The step path on loopback (issue 40): where a decode step's time goes hop by hop, and three ratios to in-process.

The breakdown times single-token steps of a session that asks its servers for a trace: each server notes
(time.perf_counter_ns, one clock on one machine) when a step's message was read whole, decoded, when its
compute began and ended on the compute thread, and when its reply was ready; the client notes when each
message's frame went to its daemon and each reply came back whole. Between those stamps, per hop:

    client Python   from the step's call (or the previous hop's reply) to this hop's frame leaving for p2pd
    p2pd out        hivemind's write, client daemon, loopback TCP, server daemon, the server's frame read
    server before   decode, checks, admission, hand-off to the compute thread
    compute         the blocks, on the compute thread
    server after    hand-back to the event loop, push check, reply packed
    p2pd back       the reply's frame, server daemon, loopback TCP, client daemon, hivemind's read
    client return   (once per step) from the last reply to the step's result in the caller's thread

The parts add up to the whole step. For scale: a plain-TCP loopback echo of the same message size in
Python, which is what the daemons' two legs would cost without them.

The ratios, each with its in-process baseline in this run: decode steps/s (batch 1) against the same
model in transformers; per-hop overhead of a tiny block against the same spans stepped in-process;
forward tokens/s of a 4x128 batch (the plan's train shape) against the same model in transformers.

    python -m benchmarks.step [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

import socket
import statistics
import threading
import time

import torch

from benchmarks.common import (
    Bench,
    Figure,
    Plan,
    figures_table,
    interleaved,
    local_model,
    markdown_table,
    run_section,
    seed_everything,
    timed_figure,
    token_ids,
)
from benchmarks.inference import generation_figures, hop_overhead_figures
from benchmarks.serving import forward_step

SECTION = "step"
HOP_PARTS = ("client Python", "p2pd out", "server before compute", "compute", "server after compute", "p2pd back")
RETURN = "client return"
MESSAGE_OVERHEAD = 256  # bytes of a step message beside its hidden state (header, mask, positions): about


def hop_parts(session, began: int, ended: int) -> list[dict[str, float]]:
    """Seconds of each part of each hop of the session's last step, from its stamps (see the module's doc)."""
    hops, previous = [], began
    for span in session.spans:
        received, decoded, start, end, replied = span.trace
        sent, back = span.stream.sent_ns, span.stream.received_ns
        stamps = (previous, sent, received, start, end, replied, back)
        hops.append({part: (b - a) / 1e9 for part, a, b in zip(HOP_PARTS, stamps, stamps[1:])})
        previous = back
    hops[-1][RETURN] = (ended - previous) / 1e9
    return hops


def traced_steps(client, hidden_size: int, plan: Plan) -> list[list[dict[str, float]]]:
    """The parts of each hop of single-token steps after a prompt-sized prefill, through the client's session."""
    torch.manual_seed(0)
    steps = []
    with client.open_session(plan.prompt + plan.warmup + plan.session_steps) as session:
        session.trace = True
        session.step(torch.randn(1, plan.prompt, hidden_size))
        token = torch.randn(1, 1, hidden_size)
        for i in range(plan.warmup + plan.session_steps):
            began = time.perf_counter_ns()
            session.step(token)
            ended = time.perf_counter_ns()
            if session.chainable(token):
                raise RuntimeError("the breakdown needs client-driven steps; this session chains them")
            if i >= plan.warmup:
                steps.append(hop_parts(session, began, ended))
    return steps


def tcp_echo_rtt(nbytes: int, calls: int = 50) -> float:
    """Median round trip of `nbytes` echoed over a plain loopback TCP socket, in Python: no daemons."""
    server = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            for _ in range(calls):
                data = b""
                while len(data) < nbytes:
                    data += conn.recv(nbytes - len(data))
                conn.sendall(data)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    times, payload = [], b"x" * nbytes
    with socket.create_connection(server.getsockname(), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(calls):
            began = time.perf_counter()
            conn.sendall(payload)
            got = 0
            while got < nbytes:
                got += len(conn.recv(nbytes - got))
            times.append(time.perf_counter() - began)
    thread.join(timeout=10)
    server.close()
    return statistics.median(times)


def breakdown_figures(client, hidden_size: int, plan: Plan) -> list[Figure]:
    """One figure per part: its mean per hop (ms; means add up to the mean step, medians would not), with its share
    of the step and its median in the note."""
    steps = []
    for _ in range(max(1, plan.repeats // 2)):
        steps += traced_steps(client, hidden_size, plan)
    hops = len(steps[0])
    per_step = {part: [sum(hop.get(part, 0.0) for hop in step) for step in steps] for part in (*HOP_PARTS, RETURN)}
    totals = [sum(parts) for parts in zip(*per_step.values())]
    total = statistics.mean(totals)
    echo = tcp_echo_rtt(4 * hidden_size + MESSAGE_OVERHEAD)
    figures = []
    for part, samples in per_step.items():
        per = 1 if part == RETURN else hops
        mean, median = 1e3 * statistics.mean(samples) / per, 1e3 * statistics.median(samples) / per
        figures.append(Figure(SECTION, f"decode step: {part}" + ("" if part == RETURN else ", per hop"), "ms", mean,
                              None, note=f"{statistics.mean(samples) / total:.0%} of the step; median {median:.3f}",
                              details={"part": part, "samples_ms": [1e3 * s for s in samples]}))
    figures.append(Figure(SECTION, f"decode step, {hops} hops (sum of the parts)", "ms", 1e3 * total, None,
                          note=f"client-driven; median {1e3 * statistics.median(totals):.3f}; plain-TCP loopback echo "
                               f"of a step's size in Python, for scale: {1e3 * echo:.3f} ms per round trip",
                          details={"part": "step", "echo_ms": 1e3 * echo}))
    return figures


def forward_figure(local, client, plan: Plan) -> Figure:
    shape = plan.train_shape
    ids = token_ids(local.config.vocab_size, *shape)
    t = interleaved({"local": forward_step(local, ids), "swarm": forward_step(client, ids)}, plan.repeats, plan.warmup)
    return timed_figure(SECTION, f"forward tokens/s, batch {shape[0]}x{shape[1]}, full model", "tokens/s",
                        t["swarm"], t["local"], amount=shape[0] * shape[1], baseline_name="in-process")


def run(bench: Bench) -> list[Figure]:
    seed_everything()
    plan = bench.plan
    tiny, wide = bench.model(plan.latency_hidden), bench.model(plan.wide_hidden)
    relayed = bench.client(tiny, chaining=False)  # on loaded cores the client might chain: the stamps are the relay's
    figures = breakdown_figures(relayed, relayed.config.hidden_size, plan)
    figures += hop_overhead_figures(tiny, bench.client(tiny), bench.swarm(tiny), plan, SECTION)
    local, client = local_model(wide), bench.client(wide)
    decode = [f for f in generation_figures(local, client, plan, 1, SECTION) if f.unit == "steps/s"]
    return figures + decode + [forward_figure(local, client, plan)]


def step_table(figures: list[Figure]) -> str:
    """The breakdown as its own table (part, ms per hop, share), then the ratios."""
    parts = [f for f in figures if "part" in f.details]
    rows = [[f.details["part"], f"{f.swarm:.3f}", f.note] for f in parts]
    breakdown = markdown_table(["decode step part", "ms (mean; per hop, but the return)", "share, median"], rows)
    return breakdown + "\n\n" + figures_table([f for f in figures if "part" not in f.details])


def main(argv: list[str] | None = None) -> None:
    run_section(run, step_table, __doc__, SECTION, argv)


if __name__ == "__main__":
    main()
