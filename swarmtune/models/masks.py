"""Additive attention masks built from a 2D padding mask, the same rules as transformers' masking_utils."""

from __future__ import annotations

import torch


def causal_mask(
    attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype, sliding_window: int | None = None
) -> torch.Tensor:
    """A [batch, 1, query_length, key_length] additive mask.

    `attention_mask` is [batch, key_length] with 1 for real tokens and 0 for padding; the
    queries are the last `query_length` key positions. Masked entries hold the dtype's
    minimum rather than -inf, so rows that see only padding stay finite.
    """
    batch, key_length = attention_mask.shape
    device = attention_mask.device
    q_idx = torch.arange(key_length - query_length, key_length, device=device)[:, None]
    kv_idx = torch.arange(key_length, device=device)[None, :]
    allowed = kv_idx <= q_idx
    if sliding_window is not None:
        allowed = allowed & (kv_idx > q_idx - sliding_window)
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    mask = torch.zeros(batch, 1, query_length, key_length, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
