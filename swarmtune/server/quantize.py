"""8-bit and 4-bit blocks with bitsandbytes: how the paper fits Llama 2 70B (nf4) and BLOOM 176B (int8).

Every linear layer of a block becomes its bitsandbytes counterpart, holding the original weights
until the module moves to its device, which is when bitsandbytes quantizes them. Non-linear
parameters (norms, MoE routers and fused expert tensors) stay in the compute dtype. LoRA slots
wrap the quantized layers, so client adapters run in the compute dtype on top of them.
"""

from __future__ import annotations

import torch
from torch import nn

QUANT_TYPES = ("none", "int8", "nf4")
_BYTES_PER_WEIGHT = {"int8": 1.0, "nf4": 0.5 + 1 / 32}  # nf4: 4 bits plus one fp16 absmax per 64 weights


def quantize(module: nn.Module, quant: str, compute_dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Replace the linear layers inside `module` by quantized ones, then move it to `device` (which quantizes)."""
    if quant not in QUANT_TYPES:
        raise ValueError(f"Unknown quantization {quant!r}: use one of {', '.join(QUANT_TYPES)}")
    if quant != "none":
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, _quantized_linear(child, quant, compute_dtype))
    return module.to(device)


def _quantized_linear(linear: nn.Linear, quant: str, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    bias = linear.bias is not None
    weight = linear.weight.data.to(torch.float16 if compute_dtype == torch.float32 else compute_dtype)
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return layer


def block_bytes(block: nn.Module, quant: str, dtype: torch.dtype) -> int:
    """Memory of one block once quantized (linear weights at the quantized size, the rest in `dtype`)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0.0
    for module in block.modules():
        for name, param in module.named_parameters(recurse=False):
            quantized = quant != "none" and type(module) is nn.Linear and name == "weight"
            total += param.numel() * (_BYTES_PER_WEIGHT[quant] if quantized else itemsize)
    return int(total)
