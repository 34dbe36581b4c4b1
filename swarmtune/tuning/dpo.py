"""Direct Preference Optimization (Rafailov et al., 2023) over the swarm.

The reference model of DPO is the frozen model itself: on a swarm, the same servers with the
client's adapter left out of the requests (no LoRA sent, no soft prompts). Its log-probabilities
come from one more forward pass under no_grad, which keeps nothing for a backward, and nothing
is copied. Batches hold N pairs as 2N rows, the chosen answers first (see swarmtune.tuning.data).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from swarmtune.client.model import SwarmForCausalLM
from swarmtune.tuning.data import IGNORE


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of the labelled tokens (each predicted from the one before)."""
    labels = labels[:, 1:]
    mask = labels != IGNORE
    logps = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.masked_fill(~mask, 0).flatten(),
                             reduction="none").view_as(labels)
    return (logps * mask).sum(-1)


def loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO's loss from per-row log-probabilities of 2N rows (chosen, then rejected), and what to log: the
    implicit rewards beta * log(pi / pi_ref) of both answers, how often the chosen one's is higher (reward
    accuracy) and by how much (reward margin)."""
    rewards = beta * (policy - reference).detach()
    chosen, rejected = (policy - reference).chunk(2)
    out = -F.logsigmoid(beta * (chosen - rejected)).mean()
    chosen_rewards, rejected_rewards = rewards.chunk(2)
    return out, {"reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
                 "reward_margin": (chosen_rewards - rejected_rewards).mean(),
                 "rewards_chosen": chosen_rewards.mean(), "rewards_rejected": rejected_rewards.mean()}


def reference_logps(model: SwarmForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probabilities of the frozen model: the same swarm, the adapter off, nothing kept for a backward."""
    with torch.no_grad(), adapter_off(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_logps(logits, batch["labels"])


@contextlib.contextmanager
def adapter_off(model: SwarmForCausalLM) -> Iterator[None]:
    """The client's LoRA and soft prompts left out of the model's requests for a while."""
    lora, prompts = model.lora, model.soft_prompts
    model.lora = model.soft_prompts = None
    try:
        yield
    finally:
        model.lora, model.soft_prompts = lora, prompts


def step(model: SwarmForCausalLM, batch: dict[str, torch.Tensor], beta: float) -> tuple[torch.Tensor, dict]:
    """(loss, metrics) of a batch of pairs: the reference forward first, then the policy's."""
    reference = reference_logps(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return loss(sequence_logps(logits, batch["labels"]), reference, beta)
