"""DeepSeek-V3 (V3, R1, V3.1; Kimi-K2 uses the same architecture): MLA attention and shared-expert MoE.

Its blocks take the rotary families' arguments. What differs: the first `first_k_dense_replace`
blocks have a dense MLP and the others routed experts beside shared ones; attention caches one
compressed latent per token (kv_lora_rank values plus the qk_rope_head_dim rotary key, one
"head"), expanded to keys and values after the cache read; checkpoints store experts one by one.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.models.deepseek_v3 import modeling_deepseek_v3

from swarmtune.models.family import Family, StateDict
from swarmtune.models.kv_cache import CacheShape
from swarmtune.models.rotary import layer_inputs

# MLA's projections (q_proj where q_lora_rank is None, q_a/q_b otherwise), the MLP of the dense blocks and the
# shared experts of the MoE blocks; each block has some of them (routed experts are fused tensors, not linears)
LORA_TARGETS = ("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj")


def cache_shape(config: PretrainedConfig) -> CacheShape:
    """transformers' MLA passes ``cache.update(kv_latent [b, 1, t, kv_lora_rank], k_rot [b, 1, t, rope_dim])``."""
    return CacheShape(1, config.kv_lora_rank, 1, config.qk_rope_head_dim)


def block_state(state: StateDict, config: PretrainedConfig) -> StateDict:
    """Per-expert gate/up/down tensors on disk -> the fused expert tensors of transformers 5.x modules."""
    per_expert = {f"mlp.experts.{i}.{name}.weight" for i in range(config.n_routed_experts)
                  for name in ("gate_proj", "up_proj", "down_proj")}
    if not per_expert <= set(state):
        return state  # a dense block, fused experts (saved as the modules hold them), or a mismatch named on load
    out = {k: v for k, v in state.items() if k not in per_expert}  # surplus experts stay, to be named on load

    def stacked(*names: str) -> torch.Tensor:
        return torch.stack([torch.cat([state[f"mlp.experts.{i}.{name}.weight"] for name in names])
                            for i in range(config.n_routed_experts)])

    out["mlp.experts.gate_up_proj"] = stacked("gate_proj", "up_proj")
    out["mlp.experts.down_proj"] = stacked("down_proj")
    return out

DEEPSEEK_V3 = Family(
    model_type="deepseek_v3",
    block_class=modeling_deepseek_v3.DeepseekV3DecoderLayer,
    block_prefix="model.layers.{}.",
    embed_key="model.embed_tokens.weight",
    final_norm_prefix="model.norm.",
    final_norm_class=lambda config: modeling_deepseek_v3.DeepseekV3RMSNorm(config.hidden_size,
                                                                           eps=config.rms_norm_eps),
    make_position_module=lambda config: modeling_deepseek_v3.DeepseekV3RotaryEmbedding(config=config),
    layer_inputs=layer_inputs,
    convert_block_state=block_state,
    lora_targets=LORA_TARGETS,
    cache_shape=cache_shape,
    # the router runs in float32 (transformers' _keep_in_fp32_modules_strict): bf16 scores would pick other experts
    fp32_keys=("mlp.gate.weight", "mlp.gate.e_score_correction_bias"),
)
