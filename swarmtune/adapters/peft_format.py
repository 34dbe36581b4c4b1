"""Adapters on disk: PEFT's LoRA format (so plain `peft` loads them on a local model) plus soft prompts.

An adapter directory holds
  adapter_config.json, adapter_model.safetensors   PEFT LoRA (and a trained LM head as `modules_to_save`)
  prompts.json, prompts.safetensors                soft prompts, which PEFT's LoRA format cannot carry
LoRA keys are PEFT's: ``base_model.model.<the block's checkpoint prefix><path>.lora_A.weight``, e.g.
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (llama) or
``base_model.model.transformer.h.3.self_attention.query_key_value.lora_A.weight`` (bloom).
Every file is written atomically, so a crash never leaves a half-written adapter behind.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from transformers import PretrainedConfig

from swarmtune.adapters.lora import ClientLora, target_shapes
from swarmtune.adapters.prompts import SoftPrompts
from swarmtune.atomic import write_atomic
from swarmtune.errors import UserError
from swarmtune.models.family import Family
from swarmtune.models.registry import get_family

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROMPTS_CONFIG = "prompts.json"
PROMPTS_WEIGHTS = "prompts.safetensors"
PEFT_PREFIX = "base_model.model."
LM_HEAD_KEY = PEFT_PREFIX + "lm_head.weight"


class AdapterError(UserError, ValueError):
    """An adapter that is missing, malformed, or made for another model."""


@dataclass
class Adapter:
    """What an adapter directory holds, ready to attach to a `SwarmForCausalLM` of the same base model."""

    lora: ClientLora | None = None
    soft_prompts: SoftPrompts | None = None
    lm_head: torch.Tensor | None = None


# ---- writing -------------------------------------------------------------------------------------


def save_adapter(out_dir: str, config: PretrainedConfig, base_model: str, lora: ClientLora | None = None,
                 soft_prompts: SoftPrompts | None = None, lm_head: torch.Tensor | None = None) -> str:
    """Write whichever of LoRA, LM head and soft prompts are given to `out_dir`; returns `out_dir`."""
    if lm_head is not None and lora is None:
        raise ValueError("a trained LM head is stored as PEFT modules_to_save, which needs a LoRA adapter")
    os.makedirs(out_dir, exist_ok=True)
    if lora is not None:
        family = get_family(config.model_type)
        tensors = {}
        for key in lora.keys:
            a, b = lora.pair(key)
            tensors[peft_key(family, key, "A")] = a.detach().float().contiguous()
            tensors[peft_key(family, key, "B")] = b.detach().float().contiguous()
        if lm_head is not None:
            tensors[LM_HEAD_KEY] = lm_head.detach().float().contiguous()
        write_atomic(os.path.join(out_dir, ADAPTER_WEIGHTS), safetensors_bytes(tensors, metadata={"format": "pt"}))
        peft_config = lora_config_dict(lora, family, config, base_model, with_lm_head=lm_head is not None)
        write_atomic(os.path.join(out_dir, ADAPTER_CONFIG), json.dumps(peft_config, indent=2, sort_keys=True).encode())
    if soft_prompts is not None:
        parts = (("prompt", soft_prompts.prompt), ("deep", soft_prompts.deep))
        tensors = {name: p.detach().float().contiguous() for name, p in parts if p is not None}
        write_atomic(os.path.join(out_dir, PROMPTS_WEIGHTS), safetensors_bytes(tensors, metadata={"format": "pt"}))
        meta = dict(length=soft_prompts.length, shallow=soft_prompts.prompt is not None,
                    deep=soft_prompts.deep is not None,
                    hidden_size=config.hidden_size, num_blocks=config.num_hidden_layers,
                    base_model_name_or_path=base_model)
        write_atomic(os.path.join(out_dir, PROMPTS_CONFIG), json.dumps(meta, indent=2).encode())
    return out_dir


def peft_key(family: Family, key: str, ab: str) -> str:
    """ClientLora key ("3.self_attn.q_proj") -> PEFT state dict key of its A or B matrix."""
    block, path = key.split(".", 1)
    return f"{PEFT_PREFIX}{family.block_key_prefix(int(block))}{path}.lora_{ab}.weight"


def lora_config_dict(lora: ClientLora, family: Family, config: PretrainedConfig, base_model: str,
                     with_lm_head: bool = False) -> dict:
    """adapter_config.json content, as `peft.LoraConfig.save_pretrained` writes it."""
    from peft import LoraConfig

    blocks = sorted({int(k.split(".", 1)[0]) for k in lora.keys})
    paths = sorted({k.split(".", 1)[1] for k in lora.keys})
    grid = len(lora.keys) == len(blocks) * len(paths)
    if grid:  # the same projections in every chosen block: PEFT's usual target_modules + layers_to_transform
        targets: list[str] = paths
        partial = blocks != list(range(config.num_hidden_layers))
        layers = blocks if partial else None
        pattern = family.block_prefix.split(".{}")[0].rsplit(".", 1)[-1] if partial else None
    else:  # an irregular set (e.g. imported): name every module in full
        targets = [family.block_key_prefix(int(k.split(".", 1)[0])) + k.split(".", 1)[1] for k in lora.keys]
        layers = pattern = None
    peft_config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.train_dropout, use_rslora=lora.use_rslora,
        target_modules=targets, layers_to_transform=layers, layers_pattern=pattern, bias="none",
        task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True,
        modules_to_save=["lm_head"] if with_lm_head else None,
    )
    out = peft_config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in out.items()}


# ---- reading -------------------------------------------------------------------------------------


def load_adapter(adapter: str, config: PretrainedConfig, revision: str | None = None) -> Adapter:
    """Read an adapter directory (or hub repository) for a base model with `config`."""
    files = _AdapterFiles(adapter, revision)
    out = Adapter()
    if files.has(ADAPTER_CONFIG):
        out.lora, out.lm_head = _load_lora(files, config)
    if files.has(PROMPTS_CONFIG):
        out.soft_prompts = _load_prompts(files, config)
    if out.lora is None and out.soft_prompts is None:
        raise AdapterError(f"{adapter} holds neither {ADAPTER_CONFIG} nor {PROMPTS_CONFIG}")
    return out


def load_lora(adapter: str, config: PretrainedConfig, revision: str | None = None) -> ClientLora:
    """A PEFT LoRA adapter (written by `save_adapter` or by plain PEFT) as a ClientLora."""
    lora = load_adapter(adapter, config, revision).lora
    if lora is None:
        raise AdapterError(f"{adapter} has no {ADAPTER_CONFIG}")
    return lora


class _AdapterFiles:
    """Files of a local adapter directory or of a hub repository (downloaded on first use)."""

    def __init__(self, adapter: str, revision: str | None):
        self.adapter, self.revision = adapter, revision
        self.local = os.path.isdir(adapter)

    def has(self, name: str) -> bool:
        if self.local:
            return os.path.exists(os.path.join(self.adapter, name))
        from huggingface_hub import file_exists

        return file_exists(self.adapter, name, revision=self.revision)

    def path(self, name: str) -> str:
        if self.local:
            return os.path.join(self.adapter, name)
        from huggingface_hub import hf_hub_download

        return hf_hub_download(self.adapter, name, revision=self.revision)


_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "bias": "none",
                "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "target_parameters": None}


def _load_lora(files: _AdapterFiles, config: PretrainedConfig) -> tuple[ClientLora, torch.Tensor | None]:
    with open(files.path(ADAPTER_CONFIG)) as f:
        peft_config = json.load(f)
    if peft_config.get("peft_type") != "LORA":
        raise AdapterError(f"{files.adapter}: only LoRA adapters are supported, not {peft_config.get('peft_type')}")
    for option, plain in _UNSUPPORTED.items():
        if peft_config.get(option, plain) not in (plain, None, {}, False, []):
            raise AdapterError(f"{files.adapter}: LoRA option {option}={peft_config[option]!r} is not supported")
    extra = set(peft_config.get("modules_to_save") or []) - {"lm_head"}
    if extra:
        raise AdapterError(f"{files.adapter}: modules_to_save {sorted(extra)} are not supported (only lm_head)")
    state = load_file(files.path(ADAPTER_WEIGHTS))
    lm_head = state.pop(LM_HEAD_KEY, None)
    family = get_family(config.model_type)
    pairs = _lora_pairs(state, family, files.adapter)
    known = target_shapes(config)  # every target layer of every block
    shapes = {}
    for key, (a, b) in pairs.items():
        if key not in known:
            raise AdapterError(f"{files.adapter}: LoRA on {key}, which {config.model_type} blocks lack")
        if (a.shape[1], b.shape[0]) != known[key] or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{files.adapter}: LoRA shapes of {key} ({list(a.shape)}, {list(b.shape)}) do not "
                             f"match the base model's {known[key]}")
        shapes[key] = known[key]
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1 or ranks != {peft_config["r"]}:
        raise AdapterError(f"{files.adapter}: LoRA ranks {sorted(ranks)} differ from r={peft_config['r']}")
    if lm_head is not None and tuple(lm_head.shape) != (config.vocab_size, config.hidden_size):
        raise AdapterError(f"{files.adapter}: lm_head shape {list(lm_head.shape)} does not match the base model")
    lora = ClientLora(shapes, rank=peft_config["r"], alpha=peft_config["lora_alpha"],
                      dropout=peft_config.get("lora_dropout", 0.0), use_rslora=peft_config.get("use_rslora", False))
    with torch.no_grad():
        for key, (a, b) in pairs.items():
            dst_a, dst_b = lora.pair(key)
            dst_a.copy_(a)
            dst_b.copy_(b)
    return lora.eval(), lm_head  # eval: no dropout until someone trains it further


def _lora_pairs(state: dict[str, torch.Tensor], family: Family, where: str) -> dict[str, tuple]:
    """PEFT keys -> {ClientLora key: (A, B)}; tolerates an adapter name before '.weight'."""
    block_prefix = re.escape(PEFT_PREFIX + family.block_prefix).replace(re.escape("{}"), r"(\d+)")
    pattern = re.compile(block_prefix + r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        match = pattern.fullmatch(name)
        if match is None:
            raise AdapterError(f"{where}: unexpected tensor {name} in {ADAPTER_WEIGHTS}")
        block, path, ab = match.groups()
        found.setdefault(f"{int(block)}.{path}", {})[ab] = tensor
    missing = [key for key, ab in found.items() if set(ab) != {"A", "B"}]
    if missing:
        raise AdapterError(f"{where}: LoRA {missing[0]} lacks its A or B matrix")
    if not found:
        raise AdapterError(f"{where}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return {key: (ab["A"], ab["B"]) for key, ab in found.items()}


def _load_prompts(files: _AdapterFiles, config: PretrainedConfig) -> SoftPrompts:
    with open(files.path(PROMPTS_CONFIG)) as f:
        meta = json.load(f)
    if (meta["hidden_size"], meta["num_blocks"]) != (config.hidden_size, config.num_hidden_layers):
        raise AdapterError(f"{files.adapter}: prompts are for hidden size {meta['hidden_size']} and "
                         f"{meta['num_blocks']} blocks, not this model's")
    state = load_file(files.path(PROMPTS_WEIGHTS))
    prompts = SoftPrompts(meta["length"], meta["hidden_size"], meta["num_blocks"], shallow=meta["shallow"],
                          deep=meta["deep"])
    prompts.load_state_dict(state)
    return prompts
