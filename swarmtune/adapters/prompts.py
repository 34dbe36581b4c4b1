"""Trainable soft prompts: a prefix of input embeddings and, optionally, a prefix per remote block.

Both kinds occupy the same `length` positions in front of every example. The input prefix is
what the first block sees there; deep prompts are added to those positions before every block
(by the servers, see `swarmtune.models.span.add_deep_prompt`), so each block gets its own
trainable offset. With deep prompts only, the prefix positions start from zero embeddings.
"""

from __future__ import annotations

import torch
from torch import nn


class SoftPrompts(nn.Module):
    """`prompt` [length, hidden] prepended to the inputs; `deep` [num_blocks, length, hidden] per block."""

    def __init__(self, length: int, hidden_size: int, num_blocks: int, shallow: bool = True, deep: bool = False,
                 init_embeddings: torch.Tensor | None = None, seed: int = 0):
        super().__init__()
        if length < 1 or not (shallow or deep):
            raise ValueError("soft prompts need length >= 1 and at least one of shallow or deep")
        self.length = length
        self.prompt = nn.Parameter(_init_prompt(length, hidden_size, init_embeddings, seed)) if shallow else None
        # Deep prompts start at zero: training begins from the unchanged model (plus the input prefix).
        self.deep = nn.Parameter(torch.zeros(num_blocks, length, hidden_size)) if deep else None

    def extend(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
               labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Prepend the prefix: to the embeddings, as attended positions to the mask, as ignored labels."""
        batch = embeds.shape[0]
        if self.prompt is not None:
            prefix = self.prompt.to(embeds.dtype).expand(batch, -1, -1)
        else:
            prefix = embeds.new_zeros(batch, self.length, embeds.shape[-1])
        embeds = torch.cat([prefix, embeds], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones(batch, embeds.shape[1] - self.length, dtype=torch.long, device=embeds.device)
        ones = attention_mask.new_ones(batch, self.length)
        attention_mask = torch.cat([ones, attention_mask], dim=1)
        if labels is not None:
            labels = torch.cat([labels.new_full((batch, self.length), -100), labels], dim=1)
        return embeds, attention_mask, labels

    def deep_prompts(self) -> torch.Tensor | None:
        """Deep prompts as `SwarmForCausalLM.deep_prompts` gives them to servers: [num_blocks, 1, length, hidden]."""
        return self.deep.unsqueeze(1) if self.deep is not None else None


def _init_prompt(length: int, hidden_size: int, embeddings: torch.Tensor | None, seed: int) -> torch.Tensor:
    """Embeddings of random vocabulary tokens (as PEFT's sampled-vocab init): in-distribution for block 0."""
    generator = torch.Generator().manual_seed(seed)
    if embeddings is None:
        return torch.randn(length, hidden_size, generator=generator) * 0.02
    ids = torch.randint(0, embeddings.shape[0], (length,), generator=generator)
    return embeddings[ids].detach().float().clone()
