"""gpt-oss's MXFP4 expert weights, as published (`quantization_config.quant_method: mxfp4`).

Each group of 32 weights along a row is stored as 16 bytes of 4-bit E2M1 codes (low nibble first)
and one uint8 power-of-two scale with bias 127 (the OCP microscaling format). Blocks of a
checkpoint are dequantized when a server loads them; the values are exact in bfloat16.
"""

from __future__ import annotations

import torch

# The E2M1 value of each 4-bit code: sign bit, then 2 exponent bits and 1 mantissa bit.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32
SCALE_BIAS = 127


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[..., rows, groups, 16] uint8 codes and [..., rows, groups] uint8 scales -> [..., rows, groups * 32].

    One expert at a time, so the temporary code indices stay small beside a 128-expert tensor.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, not {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP // 2:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    flat_blocks = blocks.reshape(-1, *blocks.shape[-3:])
    flat_scales = scales.reshape(-1, *scales.shape[-2:])
    out = torch.empty(*flat_blocks.shape[:-1], GROUP, dtype=dtype, device=blocks.device)
    for i in range(flat_blocks.shape[0]):
        codes = flat_blocks[i].long()
        out[i, ..., 0::2] = lut[codes & 0x0F]
        out[i, ..., 1::2] = lut[codes >> 4]
        out[i] = torch.ldexp(out[i], flat_scales[i, ..., None].int() - SCALE_BIAS).to(dtype)
    return out.reshape(*blocks.shape[:-2], -1)


def dequantize_experts(state: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Replace each `{name}_blocks`/`{name}_scales` pair by `{name}`, in the layout of transformers' fused
    expert parameters ([experts, in, out]: the stored rows are output features)."""
    out = dict(state)
    for name in names:
        if f"{name}_blocks" in out and f"{name}_scales" in out:  # else loading names the missing tensor
            weight = dequantize(out.pop(f"{name}_blocks"), out.pop(f"{name}_scales"))
            out[name] = weight.transpose(-1, -2).contiguous()
    return out
