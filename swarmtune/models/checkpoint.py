"""Load a span of blocks, or the client-side parts, from a Hugging Face checkpoint.

Only the safetensors shards that hold the wanted tensors are opened (or, for a hub model id,
downloaded), and only the wanted tensors are read: blocks are built on the meta device and
receive their weights directly, so a server holding 4 of 80 blocks never materialises the rest.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from functools import lru_cache

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

from swarmtune.errors import UserError, check_source
from swarmtune.models import fp8
from swarmtune.models.family import Family, StateDict
from swarmtune.models.registry import get_family
from swarmtune.models.span import SpanModel

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unreadable or lacks a tensor."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}: use one of fp32, bf16, fp16") from None


def load_config(model: str, attn_implementation: str = "sdpa", revision: str | None = None) -> PretrainedConfig:
    """The model's config with an explicit attention implementation (transformers needs one for lone blocks).

    For a hub id only config.json is fetched, through the same huggingface_hub call as the shards.
    """
    check_source(model, "model")
    source = model if os.path.isdir(model) else hub_file(model, "config.json", revision)
    config = _auto_config(source)
    config._name_or_path = model  # the hub id, as transformers records it, not the cached file's path
    family = get_family(config.model_type)  # fail early on unsupported families
    supported = family.attn_implementations
    config._attn_implementation = attn_implementation if attn_implementation in supported else supported[0]
    # What a local transformers model picks for MoE experts (mixtral); lone blocks would get None.
    config._experts_implementation = "grouped_mm"
    return config


def _auto_config(source: str) -> PretrainedConfig:
    """AutoConfig, except for checkpoints whose model_type transformers lacks but whose blocks are a family's:
    Kimi-K2's config says kimi_k2 (for its remote code) and describes a deepseek_v3 model."""
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = None  # AutoConfig names the problem
    alias = MODEL_TYPE_ALIASES.get(data.get("model_type")) if isinstance(data, dict) else None
    if alias is not None:  # without model_type and auto_map, which name the remote code
        return CONFIG_MAPPING[alias].from_dict({k: v for k, v in data.items() if k not in ("model_type", "auto_map")})
    return AutoConfig.from_pretrained(source)


def hub_file(repo: str, filename: str, revision: str | None = None) -> str:
    """Local path of one file of a hub repository, downloaded (or taken from the cache) alone."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, revision=revision)
    except Exception as e:
        raise CheckpointError(f"Cannot fetch {filename} from {repo}: {e}") from e


def hub_files(repo: str, revision: str | None = None) -> set[str]:
    """File names of a hub repository; offline, whichever of the index or single file is already cached."""
    from huggingface_hub import list_repo_files, try_to_load_from_cache

    try:
        return set(list_repo_files(repo, revision=revision))
    except Exception as e:
        cached = {name for name in (INDEX_FILE, SINGLE_FILE)
                  if isinstance(try_to_load_from_cache(repo, name, revision=revision), str)}
        if cached:
            return cached
        raise CheckpointError(f"Cannot list the files of {repo}: {e}") from e


class Checkpoint:
    """The tensor -> file map of a checkpoint directory or hub repository."""

    def __init__(self, model: str, revision: str | None = None):
        self.model, self.revision = model, revision
        self.is_local = os.path.isdir(model)
        self.weight_map = self._read_weight_map()

    def _path(self, filename: str) -> str:
        if self.is_local:
            path = os.path.join(self.model, filename)
            if not os.path.exists(path):
                raise CheckpointError(f"Checkpoint file is missing: {path}")
            return path
        return hub_file(self.model, filename, self.revision)

    def _read_weight_map(self) -> dict[str, str]:
        files = set(os.listdir(self.model)) if self.is_local else hub_files(self.model, self.revision)
        if INDEX_FILE in files:
            return _read_index(self._path(INDEX_FILE))
        # Without an index: the single file if there is one (ignoring e.g. adapter files beside it),
        # else every shard's header.
        shards = [SINGLE_FILE] if SINGLE_FILE in files else sorted(f for f in files if f.endswith(".safetensors"))
        if not shards:
            raise CheckpointError(f"No safetensors weights in {self.model} (found: {sorted(files)[:10]})")
        return {key: shard for shard in shards for key in _shard_keys(self._path(shard))}

    def resolve(self, key: str) -> str | None:
        """The stored name of `key`, allowing for checkpoints saved from the base model (no 'model.' prefix)."""
        if key in self.weight_map:
            return key
        stripped = key.partition(".")[2]
        return stripped if stripped in self.weight_map else None

    def read(self, keys: list[str]) -> StateDict:
        """Read the given tensors, opening each needed shard once. Missing keys raise CheckpointError."""
        by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for key in keys:
            stored = self.resolve(key)
            if stored is None:
                raise CheckpointError(f"Tensor {key} not found in {self.model}")
            by_file[self.weight_map[stored]].append((key, stored))
        out: StateDict = {}
        for filename, pairs in by_file.items():
            path = self._path(filename)
            try:
                with safe_open(path, framework="pt") as f:
                    for key, stored in pairs:
                        out[key] = f.get_tensor(stored)
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"Cannot read checkpoint shard {path}: {e}") from e
        return out

    def keys_with_prefix(self, prefix: str) -> list[str]:
        """Keys under `prefix`, named as the model names them (prefix included)."""
        alt = prefix.split(".", 1)[1]
        found = [k for k in self.weight_map if k.startswith(prefix)]
        if not found:
            found = [prefix + k[len(alt):] for k in self.weight_map if k.startswith(alt)]
        return found


def _read_index(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            return dict(json.load(f)["weight_map"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"Cannot read checkpoint index {path}: {e!r}") from e


def _shard_keys(path: str) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"Cannot read checkpoint shard {path}: {e}") from e


@lru_cache(maxsize=8)
def open_checkpoint(model: str, revision: str | None = None) -> Checkpoint:
    """A cached Checkpoint: loading a span and the client parts lists the files and parses the index once."""
    return Checkpoint(model, revision)


def _materialize(module: nn.Module, state: StateDict, dtype: torch.dtype, device: torch.device | str,
                 what: str, fp32_keys: tuple[str, ...] = ()) -> nn.Module:
    expected = set(module.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(f"{what}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")

    def target(key: str, value: torch.Tensor) -> torch.dtype:
        if not value.is_floating_point():
            return value.dtype
        return torch.float32 if key.endswith(fp32_keys) and fp32_keys else dtype

    state = {k: v.to(device=device, dtype=target(k, v)) for k, v in state.items()}
    try:
        module.load_state_dict(state, assign=True)
    except RuntimeError as e:  # shape mismatches between the config and the stored tensors
        raise CheckpointError(f"{what}: {e}") from e
    return module


def _unpinned(state: StateDict, read: StateDict) -> StateDict:
    """`state` holding no view into the shards' mappings once the block converted some of what it read.

    A tensor read is a view into its shard's file mapping, which stays mapped while any view lives; the
    pages read there stay in the process's RSS with it. Where every tensor is kept as read (the usual
    case), those pages are the weights themselves. Where some were converted (experts fused, fp8 or
    MXFP4 dequantized), one small tensor kept as read would hold the source's pages too: a second copy
    (a Qwen3-30B-A3B block of 1.2 GB: 2.3 GB). The tensors kept are copied instead, so the mapping goes.
    """
    mapped = {t.untyped_storage().data_ptr() for t in read.values()}
    kept = {k for k, v in state.items() if v.untyped_storage().data_ptr() in mapped}
    if len(kept) == len(state):
        return state
    return {k: v.clone() if k in kept else v for k, v in state.items()}


def load_span(
    model: str,
    start: int,
    end: int,
    dtype: str | torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    revision: str | None = None,
    config: PretrainedConfig | None = None,
) -> SpanModel:
    """Blocks [start, end) of `model` (a local directory or a hub id), reading only their tensors."""
    dtype = parse_dtype(dtype)
    config = config or load_config(model, attn_implementation, revision)
    num_layers = config.num_hidden_layers
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"Block span {start}:{end} is outside the model's {num_layers} blocks")
    family = get_family(config.model_type)
    ckpt = open_checkpoint(model, revision)
    fp8_block = fp8.block_size(config)
    blocks = nn.ModuleList()
    for index in range(start, end):
        prefix = family.block_key_prefix(index)
        what = f"block {index} of {model}"
        keys = ckpt.keys_with_prefix(prefix)
        read = {k[len(prefix):]: v for k, v in ckpt.read(keys).items()}
        raw = fp8.dequantize(read, fp8_block, what) if fp8_block is not None else read
        with torch.device("meta"):
            block = family.block_class(config, index)
        state = _unpinned(family.convert_block_state(raw, config), read)
        del read, raw
        blocks.append(_materialize(block, state, dtype, device, what, family.fp32_keys))
    position_module = family.make_position_module(config)
    if position_module is not None:
        position_module = position_module.to(device)
    span = SpanModel(family, config, start, end, blocks, position_module, dtype)
    return span.eval().requires_grad_(False)


class ClientParts(nn.Module):
    """The parts of a model that stay with the client: embeddings, final norm and LM head."""

    def __init__(self, family: Family, config: PretrainedConfig, embed_tokens: nn.Embedding,
                 embed_norm: nn.Module | None, final_norm: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.family, self.config = family, config
        self.embed_tokens, self.embed_norm = embed_tokens, embed_norm
        self.final_norm, self.lm_head = final_norm, lm_head

    def prepare_hidden(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """What the first block receives: the embeddings, after BLOOM's embedding layer norm."""
        return self.embed_norm(inputs_embeds) if self.embed_norm is not None else inputs_embeds

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(hidden))


def load_client_parts(
    model: str,
    dtype: str | torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    config: PretrainedConfig | None = None,
) -> ClientParts:
    """Embeddings, final norm and LM head of `model`, reading only those tensors."""
    dtype = parse_dtype(dtype)
    config = config or load_config(model, revision=revision)
    family = get_family(config.model_type)
    ckpt = open_checkpoint(model, revision)
    tied = ckpt.resolve(family.lm_head_key) is None
    if tied and not getattr(config, "tie_word_embeddings", False):
        raise CheckpointError(f"{model} has no {family.lm_head_key} and does not tie its embeddings")

    def load(module: nn.Module, prefix: str, what: str) -> nn.Module:
        keys = ckpt.keys_with_prefix(prefix)
        state = {k[len(prefix):]: v for k, v in ckpt.read(keys).items()}
        return _materialize(module, state, dtype, device, what)

    embed_weight = ckpt.read([family.embed_key])[family.embed_key]
    embed_tokens = nn.Embedding.from_pretrained(embed_weight.to(device=device, dtype=dtype), freeze=True)
    # On meta first: a 250k-vocab head would otherwise be allocated and randomly initialised for nothing.
    lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
    if tied:
        lm_head.weight = embed_tokens.weight
    else:
        head = ckpt.read([family.lm_head_key])[family.lm_head_key]
        lm_head.weight = nn.Parameter(head.to(device=device, dtype=dtype), requires_grad=False)
    with torch.device("meta"):
        final_norm = family.final_norm_class(config)
        embed_norm = family.embed_norm_class(config) if family.embed_norm_class else None
    final_norm = load(final_norm, family.final_norm_prefix, "final norm")
    if embed_norm is not None:
        embed_norm = load(embed_norm, family.embed_norm_prefix, "embedding norm")
    parts = ClientParts(family, config, embed_tokens, embed_norm, final_norm, lm_head)
    return parts.requires_grad_(False)
