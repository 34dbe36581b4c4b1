"""8-bit and 4-bit blocks with bitsandbytes: how the paper fits Llama 2 70B (nf4) and BLOOM 176B (int8).

Every linear layer of a block becomes its bitsandbytes counterpart, holding the original weights
until the module moves to its device, which is when bitsandbytes quantizes them. transformers 5.x
keeps an MoE block's routed experts as fused 3D parameters, not linear layers: those are stored in
int8 (absmax per row) or nf4 (bitsandbytes' code, absmax per 64 weights) expert by expert
(`QuantizedExperts`), and an expert's weight is dequantized to the compute dtype when a token is
routed to it. Norms and routers stay in the compute dtype. LoRA slots wrap the quantized layers,
so client adapters run in the compute dtype on top of them.
"""

from __future__ import annotations

import copy

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
            _quantize_experts(parent, quant, compute_dtype)
    return module.to(device)


def _quantize_experts(module: nn.Module, quant: str, compute_dtype: torch.dtype) -> None:
    """Replace the fused expert parameters ([experts, ...] 3D tensors) of `module` by QuantizedExperts, and
    run it with transformers' eager experts loop, the one that indexes them expert by expert."""
    if not hasattr(module, "config"):  # transformers' expert modules keep theirs, to pick the implementation
        return
    fused = [name for name, param in module.named_parameters(recurse=False) if param.ndim == 3]
    for name in fused:
        weight = module._parameters.pop(name)
        setattr(module, name, QuantizedExperts(weight.data, quant, compute_dtype))
    if fused:
        module.config = copy.copy(module.config)  # the block's other modules keep the shared config
        module.config._experts_implementation = "eager"


class QuantizedExperts(nn.Module):
    """A fused [experts, rows, cols] tensor stored quantized; `self[i]` is expert i in the compute dtype.

    Quantized one expert at a time, so a 128-expert tensor never needs a full-size fp32 copy.
    """

    NF4_BLOCK = 64

    def __init__(self, weight: torch.Tensor, quant: str, compute_dtype: torch.dtype):
        super().__init__()
        self.quant, self.compute_dtype, self.shape = quant, compute_dtype, tuple(weight.shape)
        table = _nf4_table() if quant == "nf4" else None
        codes, scales = zip(*(self._quantize(w.float(), table) for w in weight))
        self.codes = nn.Buffer(torch.stack(codes))
        self.scale = nn.Buffer(torch.stack(scales).to(compute_dtype))
        if table is not None:
            self.table = nn.Buffer(table.to(compute_dtype))

    def _quantize(self, w: torch.Tensor, table: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        tiny = torch.finfo(torch.float32).tiny
        if table is None:  # int8, absmax per row
            scale = w.abs().amax(-1, keepdim=True).clamp(min=tiny) / 127
            return (w / scale).round().to(torch.int8), scale
        flat = w.flatten()
        blocks = nn.functional.pad(flat, (0, -flat.numel() % self.NF4_BLOCK)).reshape(-1, self.NF4_BLOCK)
        scale = blocks.abs().amax(-1, keepdim=True).clamp(min=tiny)
        # the nearest code: the table is sorted, so bucketize against the midpoints between its values
        index = torch.bucketize(blocks / scale, (table[1:] + table[:-1]) / 2).to(torch.uint8)
        return index[:, 0::2] << 4 | index[:, 1::2], scale

    def __getitem__(self, expert: int | torch.Tensor) -> torch.Tensor:
        codes, scale = self.codes[expert], self.scale[expert]
        if self.quant == "int8":
            return codes.to(self.compute_dtype) * scale
        values = torch.stack([self.table[(codes >> 4).long()], self.table[(codes & 0x0F).long()]], dim=-1)
        values = (values.flatten(-2) * scale).flatten()
        return values[:self.shape[1] * self.shape[2]].reshape(self.shape[1:])


def _nf4_table() -> torch.Tensor:
    import bitsandbytes as bnb

    return bnb.functional.get_4bit_type("nf4", device="cpu").float()


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
    """Memory of one block once quantized (linear weights and fused experts at the quantized size, the rest
    in `dtype`)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0.0
    for module in block.modules():
        for name, param in module.named_parameters(recurse=False):
            quantized = quant != "none" and ((type(module) is nn.Linear and name == "weight") or param.ndim == 3)
            total += param.numel() * (_BYTES_PER_WEIGHT[quant] if quantized else itemsize)
    return int(total)
