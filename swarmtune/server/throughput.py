"""What this server's hardware can do with one block: how fast it runs, and how many blocks fit.

Servers announce their speed so that clients route by it and joining servers balance by it. The
figures come from a short benchmark of one randomly initialised block of the model's shape
(same dtype, device and attention implementation as served), cached on disk per configuration:
the benchmark runs once per machine and model shape, not at every start.
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

from swarmtune.models.family import get_family
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
    """Time a batched forward and single-token steps through one random block of the model's shape."""
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


def blocks_that_fit(config: PretrainedConfig, dtype: torch.dtype, device: str, quant: str,
                    reserve_bytes: int | None) -> int:
    """How many blocks fit in MEMORY_FRACTION of the device's free memory beside the KV cache.

    The cache takes `reserve_bytes`, or with None (--cache-mb auto) AUTO_CACHE_TOKENS tokens per
    block: the share that auto_cache_bytes then leaves it, so the two stay consistent.
    """
    with torch.device("meta"):
        block = get_family(config.model_type).block_class(config, 0)
    one_block = quantize_lib.block_bytes(block, quant, dtype)
    usable = free_bytes(device) * MEMORY_FRACTION
    if reserve_bytes is None:
        count = usable // (one_block + AUTO_CACHE_TOKENS * kv_bytes_per_token(config, dtype))
    else:
        count = (usable - reserve_bytes) // one_block
    return int(max(0, min(config.num_hidden_layers, count)))


def auto_cache_bytes(free_before: int, free_after: int) -> int:
    """The KV budget of --cache-mb auto, from free memory before and after loading the blocks.

    It is what the blocks left of the usable share (MEMORY_FRACTION of `free_before`), measured
    rather than computed, so that real allocation sizes and the CUDA context are accounted for;
    the other (1 - MEMORY_FRACTION) stays free for activations.
    """
    return max(0, int(free_after - free_before * (1 - MEMORY_FRACTION)))


def _random_block(config: PretrainedConfig, dtype: torch.dtype, device: str) -> SpanModel:
    family = get_family(config.model_type)
    with torch.device(device):
        blocks = nn.ModuleList([family.block_class(config, 0)]).to(dtype)
    position_module = family.make_position_module(config)
    if position_module is not None:
        position_module = position_module.to(device)
    return SpanModel(family, config, 0, 1, blocks, position_module, dtype).eval()


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
