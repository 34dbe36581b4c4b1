"""Block-scaled FP8 checkpoints as DeepSeek publishes them, dequantized on load.

The config says ``quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}``; each
quantized linear weight is stored as float8_e4m3fn next to ``<name>.weight_scale_inv``, one float32
factor per [128, 128] block (the weight is ``fp8 * scale``). A weight whose size is not a multiple
of the block ends in a partial block: kv_a_proj_with_mqa [576, 7168] has scales [5, 56], so the
block size comes from the config, never from dividing rows by scale rows.
"""

from __future__ import annotations

import math

import torch
from transformers import PretrainedConfig

from swarmtune.errors import UserError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class FP8Error(UserError, ValueError):
    """An FP8 checkpoint whose scales do not match its weights or its config."""


def block_size(config: PretrainedConfig) -> tuple[int, int] | None:
    """The [rows, columns] of one scale block, or None for a checkpoint that is not block-scaled FP8."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    if quant.get("quant_method") != "fp8":
        return None
    size = quant.get("weight_block_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(n, int) and n > 0 for n in size)):
        raise FP8Error(f"quantization_config.weight_block_size must be two positive integers, got {size!r}: "
                       f"swarmtune dequantizes block-scaled FP8 only")
    return size[0], size[1]


def dequantize(state: dict[str, torch.Tensor], block: tuple[int, int], where: str) -> dict[str, torch.Tensor]:
    """`state` with every FP8 weight and its scales replaced by the float32 weight they encode."""
    out = {k: v for k, v in state.items() if not k.endswith(SCALE_SUFFIX) and v.dtype not in FP8_DTYPES}
    for key, weight in state.items():
        if weight.dtype not in FP8_DTYPES:
            continue
        scale = state.get(key + SCALE_SUFFIX)
        if scale is None:
            raise FP8Error(f"{where}: FP8 tensor {key} has no {key}{SCALE_SUFFIX}")
        out[key] = dequantize_weight(weight, scale, block, f"{where}: {key}")
    orphans = [k for k in state if k.endswith(SCALE_SUFFIX) and k[:-len(SCALE_SUFFIX)] not in out]
    if orphans:
        raise FP8Error(f"{where}: scales {orphans[:3]} belong to no FP8 weight")
    return out


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], what: str) -> torch.Tensor:
    """A [rows, cols] FP8 weight times its per-block scales (the last block of a dimension may be partial)."""
    if weight.dim() != 2:
        raise FP8Error(f"{what}: FP8 weights must be 2-D, got shape {list(weight.shape)}")
    rows, cols = weight.shape
    expected = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale.shape) != expected:
        raise FP8Error(f"{what}: scales of shape {list(scale.shape)} do not fit a {list(weight.shape)} weight in "
                       f"{list(block)} blocks (expected {list(expected)})")
    full = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * full
