"""What this server's hardware can do with one block: how fast it runs, and how many blocks fit.

Servers announce their speed so that clients route by it and joining servers balance by it. The
figures come from a short benchmark of one randomly initialised block of the model's shape
(same dtype, device and attention implementation as served), cached on disk per configuration:
the benchmark runs once per machine and model shape, not at every start.

A model's blocks may differ in size (DeepSeek-V3's 3 dense first blocks take 1/20 of the memory of
its MoE blocks): what fits is measured in memory (`block_bytes`), and the block benchmarked is the
largest. A token reads about as many parameters in a dense block as in an MoE one (its routed and
shared experts: DeepSeek-V3 583M against 585M), so a block's speed is taken to be the same.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import psutil
import torch
from torch import nn
from transformers import PretrainedConfig

from swarmtune.models.registry import get_family
from swarmtune.models.span import SpanModel
from swarmtune.server import quantize as quantize_lib

logger = logging.getLogger(__name__)

CACHE_FILE = "throughput.json"
FORWARD_TOKENS = 512        # tokens per timed forward: a training-sized batch
MAX_FORWARDS = 10
MAX_STEPS = 32              # single-token inference steps timed
BUDGET_S = 0.3              # seconds of timing per figure, after one warm-up call
MEMORY_FRACTION = 0.8       # share of free memory for blocks and KV cache; the rest absorbs activations
AUTO_CACHE_TOKENS = 8192    # with --cache-mb auto, KV room per block that --num-blocks auto keeps (batch x length)
_BLOCK_BYTES: dict[tuple, tuple[int, ...]] = {}  # block_bytes, per configuration, dtype and quantization


@dataclass(frozen=True)
class Throughput:
    forward: float      # tokens/s through one block in a batched forward (what training routes by)
    inference: float    # single-token steps/s through one block with a KV cache


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "swarmtune")


def get_throughput(config: PretrainedConfig, dtype: torch.dtype, device: str, quant: str = "none",
                   cache_dir: str | None = None) -> Throughput:
    """The cached figures for this configuration, measured (and cached) if there are none yet."""
    path = os.path.join(cache_dir or default_cache_dir(), CACHE_FILE)
    key = cache_key(config, dtype, device, quant)
    cached = _read_cache(path)
    if key in cached:
        return Throughput(**cached[key])
    began = time.perf_counter()
    result = measure(config, dtype, device, quant)
    logger.info(f"measured {result} in {time.perf_counter() - began:.1f} s for {key}")
    _write_cache(path, {**_read_cache(path), key: asdict(result)})
    return result


def measure(config: PretrainedConfig, dtype: torch.dtype, device: str, quant: str = "none") -> Throughput:
    """Time a batched forward and single-token steps through one random block of the model's shape (its largest)."""
    block = _random_block(config, dtype, "cpu" if quant != "none" else device)  # quantized on the move to device
    span = quantize_lib.quantize(block, quant, dtype, device)
    hidden = torch.randn(1, FORWARD_TOKENS, config.hidden_size, dtype=dtype, device=device)
    with torch.inference_mode():
        forwards = _rate(lambda: span(hidden), MAX_FORWARDS, device)
        cache = span.make_cache(1, MAX_STEPS + 1)
        token = hidden[:, :1]
        steps = _rate(lambda: span(token, cache=cache), MAX_STEPS, device)
    return Throughput(forward=FORWARD_TOKENS * forwards, inference=steps)


def cache_key(config: PretrainedConfig, dtype: torch.dtype, device: str, quant: str = "none") -> str:
    """Everything the figures depend on: block shape, attention kernel, dtype, quantization, hardware, torch."""
    shape = {name: getattr(config, name, None) for name in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_local_experts",
        "moe_intermediate_size", "kv_lora_rank")}
    shape_text = " ".join(f"{k}={v}" for k, v in shape.items() if v is not None)
    layer = largest_block(config)
    shape_text += f" layer={layer}" if layer else ""  # the block measured, where it is not the first
    return (f"{config.model_type} {shape_text} attn={config._attn_implementation} {str(dtype).replace('torch.', '')} "
            f"quant={quant} {device_name(device)} torch={torch.__version__}")


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} threads={torch.get_num_threads()}" if torch.device(device).type == "cpu" else device


def free_bytes(device: str) -> int:
    """Memory this process can still allocate on `device`.

    On CUDA: the driver's free memory plus what PyTorch's caching allocator holds unused (freed
    tensors it keeps for reuse), since both are ours to fill. On CPU: available RAM.
    """
    if torch.device(device).type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused
    return psutil.virtual_memory().available


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """KV cache bytes of one token (one batch row, one position) in one block."""
    return get_family(config.model_type).cache_shape(config).nbytes_per_token(dtype)


def capacity_that_fits(config: PretrainedConfig, dtype: torch.dtype, device: str, quant: str,
                       reserve_bytes: int | None) -> float:
    """How much of the model fits in MEMORY_FRACTION of the device's free memory beside the KV cache, in units
    of its largest block: with blocks alike, how many (`block_selection.span_ends` takes the whole part).

    The cache takes `reserve_bytes`, or with None (--cache-mb auto) AUTO_CACHE_TOKENS tokens per
    block: the share that auto_cache_bytes then leaves it, so the two stay consistent. Servers
    plan with every block's size relative to the largest in parameters (`block_sizes`), alike
    whatever each serves in; a unit here is what the costliest block (by its own bytes, with its
    cache, over its relative size) takes, so that any span fitting the capacity fits the memory.
    """
    own, sizes = block_bytes(config, dtype, quant), block_sizes(config)
    cache = AUTO_CACHE_TOKENS * kv_bytes_per_token(config, dtype) if reserve_bytes is None else 0
    unit = max((mine + cache) * max(sizes) / size for mine, size in zip(own, sizes))
    usable = free_bytes(device) * MEMORY_FRACTION - (reserve_bytes or 0)
    return max(0.0, min(usable / unit, sum(sizes) / max(sizes)))


def block_sizes(config: PretrainedConfig) -> tuple[int, ...]:
    """Every block's size as all servers of the model plan with it: its parameters (bytes in float32, unquantized)."""
    return block_bytes(config, torch.float32)


def block_bytes(config: PretrainedConfig, dtype: torch.dtype, quant: str = "none") -> tuple[int, ...]:
    """Memory of each block of the model as served in `dtype` and `quant`: the family's block for that layer,
    built on the meta device (`quantize.block_bytes`)."""
    key = (config.to_json_string(use_diff=False), dtype, quant)
    if key not in _BLOCK_BYTES:  # per configuration: a start, and the throughput cache's key, ask more than once
        family = get_family(config.model_type)
        with torch.device("meta"):
            _BLOCK_BYTES[key] = tuple(quantize_lib.block_bytes(family.block_class(config, layer), quant, dtype)
                                      for layer in range(config.num_hidden_layers))
    return _BLOCK_BYTES[key]


def largest_block(config: PretrainedConfig) -> int:
    """The layer of the model's largest block (the first of equals)."""
    sizes = block_sizes(config)
    return sizes.index(max(sizes))



def auto_cache_bytes(free_before: int, free_after: int) -> int:
    """The KV budget of --cache-mb auto, from free memory before and after loading the blocks.

    It is what the blocks left of the usable share (MEMORY_FRACTION of `free_before`), measured
    rather than computed, so that real allocation sizes and the CUDA context are accounted for;
    the other (1 - MEMORY_FRACTION) stays free for activations.
    """
    return max(0, int(free_after - free_before * (1 - MEMORY_FRACTION)))


def _random_block(config: PretrainedConfig, dtype: torch.dtype, device: str) -> SpanModel:
    family, layer = get_family(config.model_type), largest_block(config)
    with torch.device(device):
        blocks = nn.ModuleList([family.block_class(config, layer)]).to(dtype)
    position_module = family.make_position_module(config)
    if position_module is not None:
        position_module = position_module.to(device)
    return SpanModel(family, config, layer, layer + 1, blocks, position_module, dtype).eval()


def _rate(fn: Callable[[], object], max_calls: int, device: str) -> float:
    """Calls per second of `fn` after one warm-up call, timed for at most BUDGET_S or `max_calls`."""
    fn()
    _sync(device)
    calls, began = 0, time.perf_counter()
    while calls < max_calls and (calls == 0 or time.perf_counter() - began < BUDGET_S):
        fn()
        _sync(device)
        calls += 1
    return calls / (time.perf_counter() - began)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and set(v) == {"forward", "inference"}}


def _write_cache(path: str, data: dict) -> None:
    """Atomically, so servers starting together never read a half-written file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
