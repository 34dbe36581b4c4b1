"""Where a forward pass's time goes, part by part: the swarm client beside the same model in-process.

Forward of a 4x128 batch with labels through a Llama of `--layers` x `--hidden` (vocab 32000, as
Llama 2's), served as two spans on a loopback swarm. Each part (embeddings, blocks + final norm,
LM head, loss) and the whole forward are timed in turns with the in-process transformers model, so
both see the same background load (issue 40: the client's local parts against in-process).

    python -m benchmarks.forward_parts [--layers 12] [--hidden 1024] [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import connect, local_model, markdown_table, token_ids
from swarmtune.local_swarm import LocalSwarm
from swarmtune.tiny_model import tiny_config

VOCAB = 32000
SHAPE = (4, 128)
PARTS = ("embeddings", "blocks + final norm", "LM head", "loss", "whole forward")


def write_model(path: str, layers: int, hidden: int) -> str:
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("llama", layers, hidden, vocab_size=VOCAB))
        model.save_pretrained(path, max_shard_size="200MB")
    return path


def timed_parts(embed, blocks, norm, head, loss, whole, ids: torch.Tensor) -> dict[str, float]:
    """Seconds of each part of one forward, then of one whole forward."""
    marks = [time.perf_counter()]
    hidden = embed(ids)
    marks.append(time.perf_counter())
    hidden = norm(blocks(hidden))
    marks.append(time.perf_counter())
    logits = head(hidden)
    marks.append(time.perf_counter())
    loss(logits, ids)
    marks.append(time.perf_counter())
    whole(ids)
    marks.append(time.perf_counter())
    return {part: b - a for part, a, b in zip(PARTS, marks, marks[1:])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the client, the baseline and each server")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/forward_parts")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = write_model(os.path.join(args.out, f"llama-{args.layers}-{args.hidden}"), args.layers, args.hidden)
    ids = token_ids(VOCAB, *SHAPE)
    half = args.layers // 2
    with LocalSwarm(path, spans=[(0, half), (half, args.layers)], log_dir=os.path.join(args.out, "logs"),
                    num_threads=args.threads) as swarm, torch.no_grad():
        local = local_model(path).requires_grad_(False)
        client = connect(path, swarm.initial_peers).requires_grad_(False)
        try:
            runs = {
                "in-process": lambda: timed_parts(
                    local.model.embed_tokens, lambda h: local.model(inputs_embeds=h).last_hidden_state,
                    lambda h: h, local.lm_head,
                    lambda x, y: local.loss_function(logits=x, labels=y, vocab_size=VOCAB),
                    lambda y: local(input_ids=y, labels=y), ids),
                "swarm client": lambda: timed_parts(
                    client.parts.embed_tokens, lambda h: client.remote(client.parts.prepare_hidden(h)),
                    client.parts.final_norm, client.parts.lm_head,
                    lambda x, y: client.loss_function(logits=x, labels=y, vocab_size=VOCAB),
                    lambda y: client(input_ids=y, labels=y), ids),
            }
            for run in runs.values():  # warm-up
                run()
            samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
            for _ in range(args.repeats):
                for name, run in runs.items():
                    samples[name].append(run())
        finally:
            client.close()
    med = {name: {part: statistics.median(s[part] for s in runs_) for part in PARTS} for name, runs_ in samples.items()}
    rows = [[part, f"{1e3 * med['swarm client'][part]:.0f}", f"{1e3 * med['in-process'][part]:.0f}",
             f"{1e3 * (med['swarm client'][part] - med['in-process'][part]):+.0f}"] for part in PARTS]
    print(markdown_table(["part (ms, median)", "swarm client", "in-process", "difference"], rows))
    ratio = med["in-process"]["whole forward"] / med["swarm client"]["whole forward"]
    print(f"forward {SHAPE[0]}x{SHAPE[1]}: in-process / swarm = {ratio:.2f} "
          f"({args.threads} torch threads, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
