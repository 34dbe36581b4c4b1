"""A preallocated KV cache for one span of blocks, duck-typed for transformers attention modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheShape:
    """What one block caches per token, as its attention passes it to ``cache.update``: keys of
    [key_heads, key_dim] and values of [value_heads, value_dim].

    GQA caches keys and values of its KV heads; DeepSeek's MLA caches one compressed latent
    (kv_lora_rank "keys") and the shared rotary key (qk_rope_head_dim "values") as a single head.
    """

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int

    @property
    def values_per_token(self) -> int:
        return self.key_heads * self.key_dim + self.value_heads * self.value_dim

    def nbytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes one token (one batch row, one position) takes in one block's cache."""
        return self.values_per_token * torch.empty((), dtype=dtype).element_size()


class SpanKVCache:
    """Keys and values for blocks [start, end), allocated once for `max_length` tokens.

    transformers' attention layers call ``cache.update(key, value, layer_idx)``; this writes the
    new entries after the ones already stored and returns views over everything so far. The
    span advances `length` once every block has run (`advance`), so all blocks of a step see the
    same offset.
    """

    def __init__(
        self,
        start: int,
        end: int,
        batch_size: int,
        max_length: int,
        shape: CacheShape,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.start, self.end = start, end
        self.max_length = max_length
        self.length = 0
        blocks = end - start
        self.keys = torch.zeros((blocks, batch_size, shape.key_heads, max_length, shape.key_dim), dtype=dtype,
                                device=device)
        self.values = torch.zeros((blocks, batch_size, shape.value_heads, max_length, shape.value_dim),
                                  dtype=dtype, device=device)

    @staticmethod
    def nbytes_for(num_blocks: int, batch_size: int, max_length: int, shape: CacheShape, dtype: torch.dtype) -> int:
        return num_blocks * batch_size * max_length * shape.nbytes_per_token(dtype)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        new = key.shape[-2]
        end = self.length + new
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} tokens > max_length {self.max_length}")
        i = layer_idx - self.start
        self.keys[i, :, :, self.length:end] = key
        self.values[i, :, :, self.length:end] = value
        return self.keys[i, :, :, :end], self.values[i, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        """Forget every entry from `length` on (speculative decoding drops the rejected drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Select batch rows (beam search): row i becomes the old row batch_indices[i]."""
        idx = batch_indices.to(self.keys.device)
        self.keys = self.keys.index_select(1, idx)
        self.values = self.values.index_select(1, idx)

    # Used by transformers when it inspects a cache (e.g. for masks); we build masks ourselves.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length
