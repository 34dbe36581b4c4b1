"""BLOOM (the paper's 176B model): ALiBi positions built from the padding mask, fused QKV."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.bloom import modeling_bloom

from swarmtune.models.family import Family
from swarmtune.models.masks import causal_mask


def layer_inputs(span, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache) -> list[dict]:
    # ALiBi biases depend on each key's position among the real tokens, so they come from the
    # whole 2D mask (past and new tokens); position_ids are not used by BLOOM.
    alibi = modeling_bloom.build_alibi_tensor(attention_mask, span.config.n_head, hidden.dtype)
    mask = causal_mask(attention_mask, hidden.shape[1], hidden.dtype)
    return [dict(alibi=alibi, attention_mask=mask, layer_past=cache) for _ in range(span.start, span.end)]


def _layer_norm(config) -> nn.Module:
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


BLOOM = Family(
    model_type="bloom",
    block_class=modeling_bloom.BloomBlock,
    block_prefix="transformer.h.{}.",
    embed_key="transformer.word_embeddings.weight",
    embed_norm_prefix="transformer.word_embeddings_layernorm.",
    embed_norm_class=_layer_norm,
    final_norm_prefix="transformer.ln_f.",
    final_norm_class=_layer_norm,
    layer_inputs=layer_inputs,
    lora_targets=("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                  "mlp.dense_4h_to_h"),
)
