"""Attention masks built from a 2D padding mask, in the form transformers builds them.

The form matters for rows that see only padding (left-padded queries): transformers gives SDPA a
boolean mask, whose fully masked rows come out as zeros, and eager attention an additive mask
with the dtype's minimum, whose fully masked rows average over all keys. Using the same form
makes even those positions match a local model exactly.
"""

from __future__ import annotations

import torch


def causal_mask(
    attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype, sliding_window: int | None = None,
    boolean: bool = False,
) -> torch.Tensor:
    """A [batch, 1, query_length, key_length] mask: boolean (True = attend) or additive in `dtype`.

    `attention_mask` is [batch, key_length] with 1 for real tokens and 0 for padding; the
    queries are the last `query_length` key positions.
    """
    batch, key_length = attention_mask.shape
    device = attention_mask.device
    q_idx = torch.arange(key_length - query_length, key_length, device=device)[:, None]
    kv_idx = torch.arange(key_length, device=device)[None, :]
    allowed = kv_idx <= q_idx
    if sliding_window is not None:
        allowed = allowed & (kv_idx > q_idx - sliding_window)
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    if boolean:
        return allowed
    mask = torch.zeros(batch, 1, query_length, key_length, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
