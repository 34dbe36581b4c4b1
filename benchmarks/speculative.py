"""Speculative decoding: tokens/s of speculative against plain greedy generation through a 3-server swarm.

On loopback and on the emulated 100 ms RTT network (full mode), for three draft/target pairs built
to agree about 50%, 80% and 95% of the time. The target is a tiny llama whose deeper blocks (all
but the first two) add little to the residual stream; each draft is its first two blocks, with
calibrated noise on its LM head setting how often its greedy token is the target's (measured on
held-out prompts before the run). Both generations run in the same run and interleaved; the draft
length is the default adaptive one, learning from the warmup on. Every speculative output is
checked token for token against the plain one.

Targets (issue 18): >= 3x plain tokens/s at 100 ms RTT with the ~80% pair; never slower than plain
with the ~50% pair.

    python -m benchmarks.speculative [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import (
    Bench,
    Figure,
    connect,
    fmt,
    interleaved,
    markdown_table,
    median,
    run_section,
    seed_everything,
    spread,
    token_ids,
)
from benchmarks.network import available, swarm_for
from swarmtune.client.speculative import DraftLength
from swarmtune.tiny_model import make_tiny_model

SECTION = "speculative"
DRAFT_BLOCKS = 2
DEEP_SCALE = 0.01                    # the deeper blocks' residual updates, scaled: the first blocks decide most
AGREEMENTS = (0.5, 0.8, 0.95)        # how often each draft's greedy token is to be the target's
SPEEDUP_TARGET, SLOWEST_PAIR = 3.0, 0.5


def target_model(bench: Bench) -> str:
    """The target checkpoint: a tiny llama whose blocks after the first two barely move the residual stream."""
    path = os.path.join(bench.out, "models", f"speculative-target-{bench.plan.layers}-{bench.plan.latency_hidden}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    make_tiny_model("llama", path, layers=bench.plan.layers, hidden=bench.plan.latency_hidden, seed=1,
                    max_shard_size="64MB")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for block in model.model.layers[DRAFT_BLOCKS:]:
            block.self_attn.o_proj.weight.mul_(DEEP_SCALE)
            block.mlp.down_proj.weight.mul_(DEEP_SCALE)
    model.save_pretrained(path, max_shard_size="64MB")
    return path


def agreement(draft, target_tokens: torch.Tensor, prompt: int) -> float:
    """How often the draft's greedy next token is the one the target generated, along the target's own outputs."""
    with torch.no_grad():
        guesses = draft(input_ids=target_tokens).logits[:, prompt - 1:-1].argmax(-1)
    return float((guesses == target_tokens[:, prompt:]).float().mean())


def calibrated_draft(path: str, want: float, target_tokens: torch.Tensor, prompt: int):
    """The target's first blocks, with LM head noise scaled (by bisection) so that they agree `want` of the time."""
    draft = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    draft.model.layers = draft.model.layers[:DRAFT_BLOCKS]
    draft.config.num_hidden_layers = DRAFT_BLOCKS
    head = draft.lm_head.weight.detach().clone()
    noise = torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * head.std()
    low, high = 0.0, 16.0
    for _ in range(16):
        scale = (low + high) / 2
        draft.lm_head.weight = torch.nn.Parameter(head + scale * noise)
        low, high = (scale, high) if agreement(draft, target_tokens, prompt) > want else (low, scale)
    draft.lm_head.weight = torch.nn.Parameter(head + (low + high) / 2 * noise)
    return draft


def drafts(path: str, new_tokens: int, prompt: int) -> dict[float, torch.nn.Module]:
    """One calibrated draft per agreement level, calibrated on prompts the benchmark does not use."""
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = token_ids(target.config.vocab_size, 32, prompt, seed=1)
    with torch.no_grad():
        tokens = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return {want: calibrated_draft(path, want, tokens, prompt) for want in AGREEMENTS}


def setting_figures(setting, client, pairs: dict[float, torch.nn.Module], bench: Bench) -> list[Figure]:
    """Plain and speculative generation interleaved; one figure per pair, speculative beside plain."""
    plan, new_tokens = bench.plan, bench.plan.speculative_tokens
    repeats = plan.net_repeats if setting.rate_mbit else plan.repeats
    # a prompt per repeat, since how often a draft agrees varies with the text
    prompts = iter(token_ids(client.config.vocab_size, plan.warmup + repeats, plan.prompt).split(1))
    this_repeat: dict[str, torch.Tensor] = {}  # its prompt and plain greedy output
    lengths = {want: DraftLength() for want in pairs}  # each pair's adaptive length, as a user's model keeps it
    rounds: dict[float, list[int]] = {want: [] for want in pairs}

    def generate(**kwargs) -> torch.Tensor:
        ids = this_repeat["prompt"]
        return client.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)

    def plain():  # first in every repeat
        this_repeat["prompt"] = next(prompts)
        this_repeat["plain"] = generate()

    def speculative(want: float):
        def run():
            client.draft_length = lengths[want]
            before = lengths[want].rounds
            ours = generate(assistant_model=pairs[want])
            rounds[want].append(lengths[want].rounds - before)
            if not torch.equal(ours, this_repeat["plain"]):
                raise AssertionError(f"speculative output with the {want:.0%} draft differs from plain greedy")
        return run

    with torch.no_grad():
        times = interleaved({"plain": plain, **{want: speculative(want) for want in pairs}},
                            repeats, plan.warmup)
    figures = []
    for want, length in lengths.items():
        per_round = new_tokens * repeats / sum(rounds[want][plan.warmup:])
        ratio = median(times["plain"]) / median(times[want])
        verdict = ""
        if setting.rtt_ms >= 100 and want == 0.8:
            verdict = f"; {'meets' if ratio >= SPEEDUP_TARGET else 'misses'} >= {SPEEDUP_TARGET:g}x"
        if want == SLOWEST_PAIR:
            verdict = f"; {'meets' if ratio >= 1 else 'misses'} never slower than plain"
        figure = Figure(SECTION, f"{setting.name}: ~{want:.0%} draft", "tokens/s", new_tokens / median(times[want]),
                        new_tokens / median(times["plain"]), "plain greedy", spread(times[want], times["plain"]),
                        f"{per_round:.2f} tokens per round trip{verdict}",
                        min(times["plain"]) / min(times[want]))
        figure.details = {"setting": setting.name, "agreement": want, "tokens_per_round": per_round,
                          "acceptance": length.acceptance_total,
                          "last_draft_length": length.next, "new_tokens": new_tokens}
        figures.append(figure)
    return figures


def run(bench: Bench) -> list[Figure]:
    seed_everything()
    settings = [s for s in bench.plan.settings if s.rate_mbit is None or s.rtt_ms >= 100]
    path = target_model(bench)
    pairs = drafts(path, bench.plan.speculative_tokens, bench.plan.prompt)
    unavailable = available()
    figures = []
    for setting in settings:
        if setting.rate_mbit is not None and unavailable:
            print(f"skipping {setting.name}: {unavailable}", file=sys.stderr)
            continue
        with swarm_for(bench, setting, path, f"speculative-{len(figures)}") as swarm:
            client = connect(path, swarm.initial_peers)
            try:
                figures += setting_figures(setting, client, pairs, bench)
            finally:
                client.close()
    return figures


def speculative_table(figures: list[Figure]) -> str:
    rows = [[f.details["setting"], f"~{f.details['agreement']:.0%}", f"{f.details['acceptance']:.0%}",
             f"{f.details['tokens_per_round']:.2f}", str(f.details["last_draft_length"]), fmt(f.baseline),
             fmt(f.swarm), f"{f.ratio:.2f}", f"{f.best_ratio:.2f}", f"±{100 * f.noise:.0f}%"] for f in figures]
    return markdown_table(["setting", "draft agrees", "per-token acceptance", "tokens per round trip", "last k",
                           "plain tokens/s", "speculative tokens/s", "speedup", "best-of-N", "noise"], rows)


def main(argv: list[str] | None = None) -> None:
    run_section(run, speculative_table, __doc__, SECTION, argv)


if __name__ == "__main__":
    main()
