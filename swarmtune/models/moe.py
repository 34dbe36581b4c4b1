"""Mixture-of-experts rotary families: qwen3_moe (Qwen3-235B-A22B), glm4_moe (GLM-4.5) and gpt_oss.

They run as the other rotary families do (rotary.layer_inputs); what differs is the checkpoint
layout of their experts, dense layers beside MoE layers (qwen3_moe's `mlp_only_layers`, glm4_moe's
`first_k_dense_replace`: transformers' block classes build the right kind per layer index), and
gpt-oss's attention sinks (eager attention only) and MXFP4 experts.
"""

from __future__ import annotations

import re

import torch
from transformers import PretrainedConfig
from transformers.models.glm4_moe import modeling_glm4_moe
from transformers.models.gpt_oss import modeling_gpt_oss
from transformers.models.qwen3_moe import modeling_qwen3_moe

from swarmtune.models import mxfp4
from swarmtune.models.family import StateDict
from swarmtune.models.rotary import ATTENTION, MLP, rotary_family

SHARED_EXPERTS = ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj")
_EXPERT_KEY = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def _fused_experts(state: StateDict, config: PretrainedConfig) -> StateDict:
    """Per-expert gate/up/down tensors (as published, and as `save_pretrained` writes them) -> the fused
    [experts, 2 * intermediate, hidden] and [experts, hidden, intermediate] parameters of transformers 5.x.

    A checkpoint already in the fused layout passes through unchanged.
    """
    experts: dict[str, dict[int, torch.Tensor]] = {"gate_proj": {}, "up_proj": {}, "down_proj": {}}
    out = {}
    for key, tensor in state.items():
        match = _EXPERT_KEY.fullmatch(key)
        if match is None:
            out[key] = tensor
        else:
            experts[match.group(2)][int(match.group(1))] = tensor
    if not experts["down_proj"]:
        return state
    count = config.num_local_experts
    if any(sorted(found) != list(range(count)) for found in experts.values()):
        return state  # loading then names the tensors that are missing or unexpected
    gate, up, down = ([experts[name][i] for i in range(count)] for name in ("gate_proj", "up_proj", "down_proj"))
    out["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
    out["mlp.experts.down_proj"] = torch.stack(down)
    return out


def _gpt_oss_block_state(state: StateDict, config: PretrainedConfig) -> StateDict:
    """MXFP4 experts (`*_blocks`/`*_scales`, as openai publishes gpt-oss) -> dequantized fused parameters;
    a checkpoint saved unquantized (`save_pretrained`) is already in the module's layout."""
    return mxfp4.dequantize_experts(state, ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))


QWEN3_MOE = rotary_family("qwen3_moe", modeling_qwen3_moe, "Qwen3Moe", lora_targets=ATTENTION + MLP,
                           convert_block_state=_fused_experts)
GLM4_MOE = rotary_family("glm4_moe", modeling_glm4_moe, "Glm4Moe", lora_targets=ATTENTION + MLP + SHARED_EXPERTS,
                          convert_block_state=_fused_experts,
                          fp32_keys=("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))
GPT_OSS = rotary_family("gpt_oss", modeling_gpt_oss, "GptOss", lora_targets=ATTENTION,
                         convert_block_state=_gpt_oss_block_state, attn_implementations=("eager",))
