"""A contiguous span of decoder blocks that runs on its own, as a server holds it."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from swarmtune.models.family import Family
from swarmtune.models.kv_cache import SpanKVCache


class SpanModel(nn.Module):
    """Blocks [start, end) plus what they need to run outside the full model (rotary embeddings).

    `forward` takes the hidden states of the new tokens, the 2D padding mask of all tokens so far
    (past and new), optional position ids (default: consecutive after the cache, as transformers
    does) and an optional KV cache. `deep_prompts` ([num_blocks, batch, prefix_len, hidden]) are
    added to the first prefix_len positions before each block.
    """

    def __init__(self, family: Family, config: PretrainedConfig, start: int, end: int, blocks: nn.ModuleList,
                 position_module: nn.Module | None, dtype: torch.dtype):
        super().__init__()
        self.family, self.config = family, config
        self.start, self.end = start, end
        self.compute_dtype = dtype
        self.blocks = blocks
        self.position_module = position_module

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def part(self, start: int, end: int) -> SpanModel:
        """Blocks [start, end) of this span, sharing their weights."""
        if (start, end) == (self.start, self.end):
            return self
        blocks = self.blocks[start - self.start:end - self.start]
        return SpanModel(self.family, self.config, start, end, blocks, self.position_module, self.compute_dtype)

    def joined(self, other: SpanModel) -> SpanModel:
        """This span and `other`, which must begin where this one ends or end where it begins."""
        first, second = (self, other) if other.start == self.end else (other, self)
        if first.end != second.start:
            raise ValueError(f"spans {self.start}:{self.end} and {other.start}:{other.end} are not adjacent")
        return SpanModel(self.family, self.config, first.start, second.end,
                         nn.ModuleList([*first.blocks, *second.blocks]), self.position_module, self.compute_dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: SpanKVCache | None = None,
        deep_prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length = hidden.shape[:2]
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=hidden.device)
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=hidden.device).expand(batch, length)
        per_layer = self.family.layer_inputs(self, hidden, attention_mask, position_ids, cache)
        for i, (block, kwargs) in enumerate(zip(self.blocks, per_layer)):
            if deep_prompts is not None:
                hidden = add_deep_prompt(hidden, deep_prompts[i], past)
            hidden = self.family.run_block(block, hidden, kwargs)
        if cache is not None:
            cache.advance(length)
        return hidden

    @property
    def windows(self) -> list[int | None]:
        """Each block's sliding window (None: full attention)."""
        return [self.family.layer_window(self.config, i) for i in range(self.start, self.end)]

    def make_cache_nbytes(self, batch_size: int, max_length: int) -> int:
        """Bytes of `make_cache(batch_size, max_length)`: what the server's KV budget charges for it."""
        return SpanKVCache.nbytes_for(batch_size, max_length, self.family.cache_shape(self.config),
                                      self.compute_dtype, self.windows)

    def cache_tokens_for(self, nbytes: int, limit: int) -> int:
        """The longest session (one row, at most `limit` tokens) whose cache fits in `nbytes`: a sliding block's
        share stops growing at its window, so this is not `nbytes` over the bytes of one token."""
        low, high = 0, limit
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.make_cache_nbytes(1, mid) <= nbytes else (low, mid - 1)
        return low

    def make_cache(self, batch_size: int, max_length: int) -> SpanKVCache:
        device = next(self.blocks.parameters()).device
        return SpanKVCache(self.start, self.end, batch_size, max_length, self.family.cache_shape(self.config),
                           self.compute_dtype, device, self.windows)


def add_deep_prompt(hidden: torch.Tensor, prompt: torch.Tensor, past: int) -> torch.Tensor:
    """Add `prompt` ([batch, prefix_len, hidden]) at absolute positions [0, prefix_len) of the sequence."""
    prefix = prompt.shape[1]
    if past >= prefix:
        return hidden
    n = min(prefix - past, hidden.shape[1])
    head = hidden[:, :n] + prompt[:, past:past + n].to(hidden.dtype)
    return torch.cat([head, hidden[:, n:]], dim=1)

