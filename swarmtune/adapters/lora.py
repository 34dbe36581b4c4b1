"""Client-owned LoRA: adapter matrices for the remote blocks' projections, held by the client.

Keys name a target layer as ``"{block}.{path inside the block}"`` (e.g. ``"3.self_attn.q_proj"``),
the same keys servers use for their LoRA slots. Initialisation and scaling follow PEFT, so an
adapter trained here exports to, and loads from, PEFT's format.
"""

from __future__ import annotations

import hashlib
import math
import secrets

import torch
from torch import nn
from transformers import PretrainedConfig

from swarmtune.models.family import present_targets
from swarmtune.models.registry import get_family


def target_shapes(config: PretrainedConfig, targets: list[str] | tuple[str, ...] | None = None,
                  blocks: list[int] | None = None) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target layer of each block, from the config alone.

    A block lacking a target is skipped (DeepSeek's dense blocks have no shared experts); a target
    that none of the blocks has is an error.
    """
    family = get_family(config.model_type)
    paths = list(dict.fromkeys(p for short in targets or family.lora_targets
                               for p in _full_paths(short, family.lora_targets)))
    shapes, found = {}, set()
    for block_index in blocks if blocks is not None else range(config.num_hidden_layers):
        with torch.device("meta"):
            block = family.block_class(config, block_index)
        for path in present_targets(block, tuple(paths)):
            layer = block.get_submodule(path)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"LoRA target {path!r} is not a linear layer in {config.model_type} blocks")
            shapes[f"{block_index}.{path}"] = (layer.in_features, layer.out_features)
            found.add(path)
    if targets:  # the family's default list may name layers that this configuration lacks
        for short in targets:
            if not found & set(_full_paths(short, family.lora_targets)):
                raise ValueError(f"LoRA target {short!r} is in none of the chosen {config.model_type} blocks")
    return shapes


def _full_paths(target: str, known: tuple[str, ...]) -> list[str]:
    """The paths inside the block that a target names: a path ('self_attn.q_proj'), or as PEFT matches
    target_modules, every path ending in it ('q_proj'; DeepSeek's 'gate_proj': the dense MLP's and the
    shared experts')."""
    matches = [k for k in known if k == target or k.endswith("." + target)]
    if not matches:
        raise ValueError(f"Unknown LoRA target {target!r}: choose from {', '.join(known)}")
    return matches


class ClientLora(nn.Module):
    """LoRA A/B parameters for every (block, target layer), plus scaling and dropout."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError("LoRA rank must be >= 1")
        self.keys = sorted(shapes, key=lambda k: (int(k.split(".", 1)[0]), k))
        self.shapes = dict(shapes)
        self.rank, self.alpha, self.train_dropout = rank, alpha, dropout
        self.use_rslora = use_rslora
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for key in self.keys:
            in_features, out_features = shapes[key]
            a = torch.empty(rank, in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default init; B starts at zero
            self.lora_A[_name(key)] = nn.Parameter(a)
            self.lora_B[_name(key)] = nn.Parameter(torch.zeros(out_features, rank))
        self._nonce = secrets.token_hex(8)

    @property
    def dropout(self) -> float:
        """Dropout on the adapter's input in training mode only, as PEFT: evaluation sees the whole adapter."""
        return self.train_dropout if self.training else 0.0

    def keys_in(self, start: int, end: int) -> list[str]:
        return [k for k in self.keys if start <= int(k.split(".", 1)[0]) < end]

    def pair(self, key: str) -> tuple[nn.Parameter, nn.Parameter]:
        return self.lora_A[_name(key)], self.lora_B[_name(key)]

    def flat_parameters(self, keys: list[str]) -> list[nn.Parameter]:
        """[A0, B0, A1, B1, ...] in the order of `keys`: the order tensors travel on the wire."""
        return [p for key in keys for p in self.pair(key)]

    def digest(self, keys: list[str]) -> str:
        """Names this exact version of these tensors: it changes whenever any of them is modified in place."""
        h = hashlib.blake2b(self._nonce.encode(), digest_size=16)
        for key in keys:
            a, b = self.pair(key)
            h.update(f"{key}:{a._version}:{b._version}:{a.data_ptr()}:{b.data_ptr()};".encode())
        h.update(f"{self.scale}:{self.dropout}".encode())
        return h.hexdigest()


def _name(key: str) -> str:
    return key.replace(".", "-")
