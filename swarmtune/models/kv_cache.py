"""A preallocated KV cache for one span of blocks, duck-typed for transformers attention modules."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Tokens a sliding block keeps beyond its window, so that this many (rejected drafts) can be rolled back:
# twice the most speculative decoding drafts in one round
ROLLBACK_TOKENS = 32


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
    """Keys and values for blocks [start, end), allocated once: `max_length` tokens for a block of full
    attention, and for a block with a sliding window only what its window needs.

    transformers' attention layers call ``cache.update(key, value, layer_idx)``; this stores the new
    entries after the ones already kept and returns everything the layer attends over. The span
    advances `length` once every block has run (`advance`), so all blocks of a step see the same offset.

    A sliding block (gpt-oss's alternate layers, mistral) attends over its last `window` tokens, so it
    keeps the last `window - 1` of them plus ROLLBACK_TOKENS, so that speculative decoding can drop that
    many rejected drafts and still see a whole window: a long session costs what it holds. Its `update`
    returns the kept entries and the new ones (positions `length - kept(layer)` on), as transformers'
    sliding cache layer does; the mask of that layer covers the same positions.
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
        windows: Sequence[int | None] | None = None,
    ):
        self.start, self.end = start, end
        self.max_length = max_length
        self.length = 0
        self.device = torch.device(device)
        windows = list(windows) if windows is not None else [None] * (end - start)
        if len(windows) != end - start:
            raise ValueError(f"{len(windows)} windows for {end - start} blocks")
        capacities = [capacity(window, max_length) for window in windows]
        self.groups: dict[int, _Group] = {}  # by capacity: the blocks that keep that many tokens
        self.slots: list[tuple[_Group, int]] = []  # block offset -> its group, its index there
        for window, cap in zip(windows, capacities):
            count = capacities.count(cap)
            if cap not in self.groups:
                needed = max_length if cap == max_length else window - 1
                self.groups[cap] = _Group(cap, needed, _zeros(count, batch_size, shape.key_heads, cap, shape.key_dim,
                                                               dtype, device),
                                          _zeros(count, batch_size, shape.value_heads, cap, shape.value_dim,
                                                 dtype, device))
            group = self.groups[cap]
            self.slots.append((group, group.used))
            group.used += 1

    @staticmethod
    def nbytes_for(batch_size: int, max_length: int, shape: CacheShape, dtype: torch.dtype,
                   windows: Sequence[int | None]) -> int:
        """Bytes of a cache of these blocks (one window, or None for full attention, per block)."""
        tokens = sum(capacity(window, max_length) for window in windows)
        return batch_size * tokens * shape.nbytes_per_token(dtype)

    @property
    def nbytes(self) -> int:
        return sum(group.keys.nbytes + group.values.nbytes for group in self.groups.values())

    @property
    def full(self) -> _Group | None:
        """The blocks that keep every token (all of them in a span without sliding windows)."""
        return self.groups.get(self.max_length)

    @property
    def keys(self) -> torch.Tensor:
        """[blocks, batch, heads, max_length, dim]: the keys of the full-attention blocks."""
        return self.full.keys

    @property
    def values(self) -> torch.Tensor:
        return self.full.values

    @property
    def batch_size(self) -> int:
        return next(iter(self.groups.values())).keys.shape[1]

    def kept(self, layer_idx: int) -> int:
        """How many of the tokens so far block `layer_idx` holds: the newest ones."""
        return self.length - self.slots[layer_idx - self.start][0].first

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        new = key.shape[-2]
        if self.length + new > self.max_length:
            raise ValueError(f"KV cache overflow: {self.length + new} tokens > max_length {self.max_length}")
        group, i = self.slots[layer_idx - self.start]
        keys, values = group.keys[i], group.values[i]
        held = self.length - group.first
        end = held + new
        if end <= group.capacity:
            keys[:, :, held:end] = key
            values[:, :, held:end] = value
            return keys[:, :, :end], values[:, :, :end]
        # a sliding block whose window moves on: attend over what it kept and the new tokens, keep the newest
        all_keys = torch.cat([keys[:, :, :held], key], dim=-2)
        all_values = torch.cat([values[:, :, :held], value], dim=-2)
        keys.copy_(all_keys[:, :, -group.capacity:])
        values.copy_(all_values[:, :, -group.capacity:])
        return all_keys, all_values

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
        for group in self.groups.values():
            group.first = max(group.first, self.length - group.capacity)

    @property
    def shortest_truncation(self) -> int:
        """The shortest length `truncate` can go back to: a sliding block must still hold its window then."""
        return max((group.first + group.needed for group in self.groups.values() if group.first > 0), default=0)

    def truncate(self, length: int) -> None:
        """Forget every entry from `length` on (speculative decoding drops the rejected drafts)."""
        if not self.shortest_truncation <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length} (its sliding blocks "
                             f"keep only their window and {ROLLBACK_TOKENS} tokens more: "
                             f"{self.shortest_truncation} is the shortest)")
        self.length = length

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Select batch rows (beam search): row i becomes the old row batch_indices[i]."""
        idx = batch_indices.to(self.device)
        for group in self.groups.values():
            group.keys = group.keys.index_select(1, idx)
            group.values = group.values.index_select(1, idx)

    # Used by transformers when it inspects a cache (e.g. for masks); we build masks ourselves.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


@dataclass(eq=False)
class _Group:
    """Blocks that keep the same number of tokens: positions [first, first + capacity) at most."""

    capacity: int
    needed: int  # the fewest past tokens a step needs (window - 1); max_length for full attention
    keys: torch.Tensor
    values: torch.Tensor
    used: int = 0
    first: int = 0  # the position of the oldest token kept


def capacity(window: int | None, max_length: int) -> int:
    """Tokens a block keeps: all of them, or (sliding) its window's past tokens and ROLLBACK_TOKENS."""
    return max_length if window is None else min(max_length, window - 1 + ROLLBACK_TOKENS)


def _zeros(blocks: int, batch: int, heads: int, length: int, dim: int, dtype: torch.dtype,
           device: torch.device | str) -> torch.Tensor:
    return torch.zeros((blocks, batch, heads, length, dim), dtype=dtype, device=device)
