"""What swarmtune needs to know about one model family, and the registry keyed by `model_type`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig

from swarmtune.models.kv_cache import CacheShape

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """How to build, run and load one family's decoder blocks and client-side parts.

    Checkpoint keys are the ones Hugging Face checkpoints use on disk; `block_prefix` is
    formatted with the block index (``"model.layers.{}."``).
    """

    model_type: str
    block_class: Callable[[PretrainedConfig, int], nn.Module]
    block_prefix: str
    embed_key: str
    final_norm_prefix: str
    lm_head_key: str = "lm_head.weight"
    embed_norm_prefix: str | None = None
    # Builds per-span helpers (rotary embedding); called once per span on the target device.
    make_position_module: Callable[[PretrainedConfig], nn.Module | None] = lambda config: None
    # Returns the keyword arguments for each block of a span for one call.
    layer_inputs: Callable[..., list[dict]] = None  # type: ignore[assignment]
    # Maps one block's checkpoint tensors (keys relative to the block) to the module's names.
    convert_block_state: Callable[[StateDict, PretrainedConfig], StateDict] = lambda state, config: state
    # Linear layers inside a block that LoRA may target, by their path inside the block; a block lacking one
    # (a dense layer beside MoE layers, or the reverse) simply has no slot there.
    lora_targets: tuple[str, ...] = ()
    # The attention implementations the blocks support, the preferred one first (gpt-oss's sinks need eager).
    attn_implementations: tuple[str, ...] = ("sdpa", "eager")
    # What one block's attention caches per token: the KV cache's size and the server's budgets follow it.
    cache_shape: Callable[[PretrainedConfig], CacheShape] = lambda config: gqa_cache_shape(config)
    # The sliding window of a block by its index (None: full attention); its cache keeps only what the window needs.
    layer_window: Callable[[PretrainedConfig, int], int | None] = lambda config, layer_idx: None
    # Block tensors (key suffixes) kept in float32 whatever the serving dtype, as transformers keeps them.
    fp32_keys: tuple[str, ...] = ()
    final_norm_class: Callable[[PretrainedConfig], nn.Module] = None  # type: ignore[assignment]
    embed_norm_class: Callable[[PretrainedConfig], nn.Module] | None = None
    extra: dict = field(default_factory=dict)

    def block_key_prefix(self, index: int) -> str:
        return self.block_prefix.format(index)

    def run_block(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def gqa_cache_shape(config: PretrainedConfig) -> CacheShape:
    """Keys and values of every KV head: 2 x kv_heads x head_dim values per token."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return CacheShape(kv_heads, head_dim, kv_heads, head_dim)


def present_targets(block: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Those of `targets` that this block has (DeepSeek's q_proj is None where q_lora_rank is set)."""
    def present(path: str) -> bool:
        parent_path, _, name = path.rpartition(".")
        try:
            parent = block.get_submodule(parent_path) if parent_path else block
        except AttributeError:
            return False
        return isinstance(getattr(parent, name, None), nn.Module)
    return [path for path in targets if present(path)]
