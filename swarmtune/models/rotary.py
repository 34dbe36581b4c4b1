"""Rotary-embedding decoder families: llama, mistral, qwen2, qwen3 and mixtral (MoE).

Their blocks share one calling convention in transformers 5.x: hidden states, an additive mask,
(cos, sin) position embeddings and a cache object with ``update``. Only the block class, the
mask window and (for mixtral) the checkpoint layout differ.
"""

from __future__ import annotations

import threading

import torch
from transformers import PretrainedConfig
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.mixtral import modeling_mixtral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from swarmtune.models.family import Family, StateDict
from swarmtune.models.masks import causal_mask

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# transformers' "dynamic" and "longrope" rotary types rewrite their inverse frequencies for each call's
# length; a server runs spans on two threads, so calls take turns (they are cheap)
_ROTARY_LOCK = threading.Lock()


def _layer_window(config: PretrainedConfig, layer_idx: int) -> int | None:
    """The sliding window of one layer, following each family's config conventions."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return config.sliding_window if layer_types[layer_idx] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def layer_inputs(span, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache) -> list[dict]:
    with _ROTARY_LOCK:
        position_embeddings = span.position_module(hidden, position_ids)
    masks: dict[tuple[int | None, int], torch.Tensor] = {}
    boolean = span.config._attn_implementation == "sdpa"
    new = hidden.shape[1]
    out = []
    for layer_idx in range(span.start, span.end):
        window = _layer_window(span.config, layer_idx)
        # the keys the layer attends over: those its cache kept (a sliding layer: its window's) and the new ones
        keys = (cache.kept(layer_idx) if cache is not None else 0) + new
        if (window, keys) not in masks:
            masks[window, keys] = causal_mask(attention_mask[:, -keys:], new, hidden.dtype, window, boolean)
        out.append(dict(attention_mask=masks[window, keys], position_ids=position_ids,
                        position_embeddings=position_embeddings, cache=cache))
    return out


def rotary_family(model_type: str, module, prefix: str, **kwargs) -> Family:
    """A family of transformers' `{prefix}DecoderLayer` blocks with rotary positions and RMSNorm."""
    return Family(
        model_type=model_type,
        block_class=getattr(module, f"{prefix}DecoderLayer"),
        block_prefix="model.layers.{}.",
        embed_key="model.embed_tokens.weight",
        final_norm_prefix="model.norm.",
        final_norm_class=lambda config: getattr(module, f"{prefix}RMSNorm")(config.hidden_size,
                                                                           eps=config.rms_norm_eps),
        make_position_module=lambda config: getattr(module, f"{prefix}RotaryEmbedding")(config=config),
        layer_inputs=layer_inputs,
        layer_window=_layer_window,
        **kwargs,
    )


def _mixtral_block_state(state: StateDict, config: PretrainedConfig) -> StateDict:
    """Per-expert w1/w2/w3 tensors on disk -> the fused expert tensors of transformers 5.x modules."""
    if not any(key.startswith("block_sparse_moe.") for key in state):
        return state
    out = {k: v for k, v in state.items() if not k.startswith("block_sparse_moe.")}
    experts = range(config.num_local_experts)

    def expert(i: int, name: str) -> torch.Tensor:
        return state[f"block_sparse_moe.experts.{i}.{name}.weight"]

    out["mlp.gate.weight"] = state["block_sparse_moe.gate.weight"]
    out["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([expert(i, "w1"), expert(i, "w3")]) for i in experts])
    out["mlp.experts.down_proj"] = torch.stack([expert(i, "w2") for i in experts])
    return out


LLAMA = rotary_family("llama", modeling_llama, "Llama", lora_targets=ATTENTION + MLP)
MISTRAL = rotary_family("mistral", modeling_mistral, "Mistral", lora_targets=ATTENTION + MLP)
QWEN2 = rotary_family("qwen2", modeling_qwen2, "Qwen2", lora_targets=ATTENTION + MLP)
QWEN3 = rotary_family("qwen3", modeling_qwen3, "Qwen3", lora_targets=ATTENTION + MLP)
MIXTRAL = rotary_family("mixtral", modeling_mixtral, "Mixtral", lora_targets=ATTENTION,
                         convert_block_state=_mixtral_block_state)
