"""Direct Preference Optimization (Rafailov et al., 2023) over the swarm.

The reference model of DPO is the frozen model itself: on a swarm, the same servers with the
client's adapter left out of the requests (no LoRA sent, no soft prompts). Its log-probabilities
come from one more forward pass under no_grad, which keeps nothing for a backward, and nothing
is copied; it runs beside the policy's pass, and both compute the LM head over the answers only.
Batches hold N pairs as 2N rows, the chosen answers first (see swarmtune.tuning.data).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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


def answer_columns(labels: torch.Tensor) -> int:
    """How many last columns hold every labelled token and the one before it: the only logits DPO needs (the
    prompts before them are context, whose logits the LM head need not compute)."""
    labelled = (labels[:, 1:] != IGNORE).any(0).nonzero()
    return labels.shape[1] - (int(labelled[0]) if labelled.numel() else 0)


def reference_logps(model: SwarmForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probabilities of the frozen model: the same swarm with the adapter off (no LoRA, no soft prompts sent),
    nothing kept for a backward. The model is left untouched, so the policy's pass may run meanwhile."""
    columns = answer_columns(batch["labels"])
    with torch.no_grad():
        hidden = model.parts.prepare_hidden(model.parts.embed_tokens(batch["input_ids"]))
        hidden = model.remote(hidden, batch["attention_mask"], active_adapter=model.active_adapter)
        return sequence_logps(model.parts.logits(hidden[:, -columns:]), batch["labels"][:, -columns:])


def policy_logps(model: SwarmForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probabilities of the model with its adapter, for the backward."""
    columns = answer_columns(batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=columns).logits
    return sequence_logps(logits, batch["labels"][:, -columns:])


def tokens_in_flight(model: SwarmForCausalLM) -> int:
    """The fewest tokens of one peer in flight that a server of the swarm admits, as they announce it (0: none
    said so yet). Two passes at once beyond it would have a server refuse one (and the client ban it a while)."""
    return min((s.tokens_in_flight for s in model.connection.view.servers.values() if s.tokens_in_flight),
               default=0)


def step(model: SwarmForCausalLM, batch: dict[str, torch.Tensor], beta: float) -> tuple[torch.Tensor, dict]:
    """(loss, metrics) of a batch of pairs. The reference's pass runs in a thread beside the policy's: the two are
    independent, so the swarm's servers (a pipeline) and the client's own parts work on both at once. A batch
    too large for both to be in flight at a server (or before any server said how many it admits) runs them
    in turn."""
    rows, length = batch["input_ids"].shape
    prefix = model.soft_prompts.length if model.soft_prompts is not None else 0
    if 2 * rows * (length + prefix) > tokens_in_flight(model):
        reference = reference_logps(model, batch)
        return loss(policy_logps(model, batch), reference, beta)
    with ThreadPoolExecutor(1, thread_name_prefix="dpo-reference") as pool:
        reference = pool.submit(reference_logps, model, batch)
        policy = policy_logps(model, batch)
        return loss(policy, reference.result(), beta)
