"""Serving batches: forward, forward+backward and a LoRA training step through a 3-server loopback swarm.

Baselines in the same run: the local transformers model (forward, forward+backward with frozen
weights, gradients w.r.t. the input embeddings) and the local PEFT model (LoRA step with the same
targets, rank and optimizer). The model is a wider tiny llama, so that its blocks dominate the cost.
Target (issue 9): forward and forward+backward >= 80% of the local model's tokens/s.

    python -m benchmarks.serving [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model

from benchmarks.common import (
    Bench,
    Figure,
    Plan,
    figures_table,
    interleaved,
    local_model,
    run_section,
    seed_everything,
    timed_figure,
    token_ids,
)
from swarmtune.adapters.lora import ClientLora, target_shapes
from swarmtune.models.registry import get_family

SECTION = "serving"
TOKENS_TARGET = 0.8


def freeze(model) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def forward_step(model, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            model(input_ids=ids)
    return step


def forward_backward_step(model, ids: torch.Tensor) -> Callable[[], None]:
    """Loss and its gradient w.r.t. the input embeddings, through frozen blocks (what prompt tuning needs)."""
    def step() -> None:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds, labels=ids).loss.backward()
    return step


def lora_step(model, params: list[torch.nn.Parameter], ids: torch.Tensor) -> Callable[[], None]:
    """One optimizer step of LoRA fine-tuning: forward, backward, AdamW."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def attach_client_lora(client, rank: int) -> list[torch.nn.Parameter]:
    """Client-owned LoRA on every target layer of every block; returns its parameters."""
    client.lora = ClientLora(target_shapes(client.config), rank=rank, alpha=2.0 * rank)
    return list(client.lora.parameters())


def peft_model(path: str, rank: int):
    """The local baseline of LoRA training: PEFT on the local model, same targets and scaling."""
    targets = sorted({t.rsplit(".", 1)[-1] for t in get_family("llama").lora_targets})
    model = get_peft_model(local_model(path), LoraConfig(r=rank, lora_alpha=2.0 * rank, lora_dropout=0.0,
                                                         target_modules=targets))
    return model, [p for p in model.parameters() if p.requires_grad]


def tokens_figures(local, client, plan: Plan, shape: tuple[int, int], section: str = SECTION) -> list[Figure]:
    ids = token_ids(local.config.vocab_size, *shape)
    tokens = shape[0] * shape[1]
    figures = []
    for what, make in (("forward", forward_step), ("forward+backward", forward_backward_step)):
        t = interleaved({"local": make(local, ids), "swarm": make(client, ids)}, plan.repeats, plan.warmup)
        figure = timed_figure(section, f"{what} tokens/s, batch {shape[0]}x{shape[1]}", "tokens/s", t["swarm"],
                              t["local"], amount=tokens)
        figure.note = f"target >= {TOKENS_TARGET:.0%} of local: {'met' if figure.ratio >= TOKENS_TARGET else 'missed'}"
        figures.append(figure)
    return figures


def training_figure(path: str, client, plan: Plan, section: str = SECTION) -> Figure:
    ids = token_ids(client.config.vocab_size, *plan.train_shape)
    peft, peft_params = peft_model(path, plan.lora_rank)
    swarm_step = lora_step(client, attach_client_lora(client, plan.lora_rank), ids)
    try:
        t = interleaved({"local": lora_step(peft, peft_params, ids), "swarm": swarm_step}, plan.repeats, plan.warmup)
    finally:
        client.lora = None
    shape = "x".join(map(str, plan.train_shape))
    return timed_figure(section, f"LoRA training step, batch {shape}, rank {plan.lora_rank}", "s", t["swarm"],
                        t["local"], baseline_name="local PEFT",
                        note="forward + backward + AdamW on LoRA of all 7 projections of every block")


def run(bench: Bench) -> list[Figure]:
    seed_everything()
    path = bench.model(bench.plan.wide_hidden)
    local, client = local_model(path), bench.client(path)
    freeze(local)
    freeze(client)
    figures = []
    for shape in bench.plan.forward_shapes:
        figures += tokens_figures(local, client, bench.plan, shape)
    return figures + [training_figure(path, client, bench.plan)]


def main(argv: list[str] | None = None) -> None:
    run_section(run, figures_table, __doc__, "serving", argv)


if __name__ == "__main__":
    main()
