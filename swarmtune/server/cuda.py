"""CUDA settings for servers, and a fixed-shape single-token step that a CUDA graph can replay.

Decoding at batch 1 is bound by reading the weights once per token; everything else a step does
(kernel launches, attention re-planning) is overhead to remove. Both helpers are no-ops or plain
PyTorch on a CPU, so tests run them there.
"""

from __future__ import annotations

import logging

import torch

from swarmtune.models import rotary
from swarmtune.models.kv_cache import SpanKVCache
from swarmtune.models.span import SpanModel

logger = logging.getLogger(__name__)


def configure(device: torch.device | str) -> None:
    """Process-wide settings for a server computing on `device` (nothing to do on a CPU).

    - The cuDNN SDPA backend plans anew for every key length it has not seen, i.e. at every
      decode step: 5-9 ms per Llama-2-70B block on an H200 instead of ~1 ms. Flash and
      memory-efficient attention have no such cost, so they stay on.
    - fp32 stays true fp32 (no TF32): a server announcing fp32 must match other fp32 servers
      within the cross-check tolerance (1e-4 relative), which TF32's ~1e-3 error exceeds.
      bf16 and fp16 matmuls are unaffected.
    """
    if torch.device(device).type != "cuda":
        return
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_flash_sdp(True)
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    torch.set_float32_matmul_precision("highest")


def supports_static_step(span: SpanModel) -> bool:
    """Whether `span` can run StaticStep: rotary families without sliding windows or experts."""
    config = span.config
    return (span.family.layer_inputs is rotary.layer_inputs and getattr(config, "num_local_experts", None) is None
            and all(window is None for window in span.windows))


MIN_WINDOW = 256  # the shortest attention window a fixed-shape step is captured for


def windows(max_length: int) -> list[int]:
    """The attention windows of a cache of `max_length` slots: powers of two from MIN_WINDOW on, then
    `max_length`. Few windows mean few graphs; tight ones mean a short session opened with a long
    max_length does not read its whole empty cache at every step."""
    out, window = [], MIN_WINDOW
    while window < max_length:
        out.append(window)
        window *= 2
    return out + [max_length]


def window_for(length: int, max_length: int) -> int:
    """The cache slots a fixed-shape step attends over when `length` (<= max_length) tokens are in use."""
    return next(window for window in windows(max_length) if window >= length)


def static_step_nbytes(span: SpanModel, batch: int, max_length: int) -> int:
    """What a session's StaticStep holds beside its KV cache, to charge to its lease: the input buffers and
    visibility mask, and for each window's graph its intermediates (a bound: fp32 attention probabilities
    and the MLP's activations of one block, since blocks run one after another) and output."""
    config, itemsize = span.config, torch.empty((), dtype=span.compute_dtype).element_size()
    heads, hidden = config.num_attention_heads, config.hidden_size
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = (3 * mlp + 6 * hidden) * itemsize
    graphs = sum(batch * (heads * window * 4 + per_token) for window in windows(max_length))
    return batch * (max_length + 2 * hidden * itemsize) + graphs


def capturable(span: SpanModel) -> bool:
    """Whether a CUDA graph can record `span`'s step: bitsandbytes' int8 matmul cannot be captured (H200,
    2026-12), and its failed capture left torch's RNG unusable for the rest of the process."""
    return not any(type(module).__name__ == "Linear8bitLt" for module in span.modules())


class _OffsetWrites:
    """A cache for transformers' attention that writes one token at a device-side offset of a SpanKVCache
    and returns the first `window` slots, so that shapes and pointers stay the same from step to step."""

    def __init__(self, cache: SpanKVCache, offset: torch.Tensor, window: int):
        self.cache, self.offset, self.window = cache, offset, window

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        i = layer_idx - self.cache.start
        keys, values = self.cache.keys[i], self.cache.values[i]
        keys.index_copy_(2, self.offset, key)
        values.index_copy_(2, self.offset, value)
        return keys[:, :, :self.window], values[:, :, :self.window]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.length


class StaticStep:
    """Single-token steps of `span` on `cache` with every shape fixed: the same kernels at every step.

    Attention covers a fixed window of the cache's slots (`window_for`), with a mask hiding the
    slots not yet written (and padding), so consecutive steps differ only in the contents of a few
    small device buffers. That lets `use_graph` (CUDA only) capture one step per window in a CUDA
    graph and replay it, which removes the per-kernel launch cost. The numbers equal
    SpanModel.forward's (tested on CPU), and the cache stays usable by SpanModel.forward (e.g. for
    a later multi-token step, or after a rollback). Only plain steps qualify: no deep prompts, no LoRA.
    """

    def __init__(self, span: SpanModel, cache: SpanKVCache, use_graph: bool = False):
        if not supports_static_step(span):
            raise ValueError(f"{span.config.model_type} spans with sliding windows or experts have no static step")
        device = cache.device
        batch = cache.batch_size
        self.span, self.cache = span, cache
        self.use_graph = use_graph and device.type == "cuda"
        self.hidden = torch.zeros(batch, 1, span.config.hidden_size, dtype=span.compute_dtype, device=device)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.offset = torch.zeros(1, dtype=torch.long, device=device)
        self.visible = torch.zeros(batch, cache.max_length, dtype=torch.bool, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # window -> graph, its output
        self.pool = None  # one memory pool that all of this step's graphs share
        self._captured_keys: torch.Tensor | None = None

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The span's output for one new token per row.

        `hidden` is [batch, 1, hidden_size]; `attention_mask` [batch, length + 1] covers every token
        so far, the new one included (1 = real, 0 = padding); `position_ids` is [batch, 1].
        """
        length = self.cache.length
        if length + 1 > self.cache.max_length:
            raise ValueError(f"KV cache overflow: {length + 1} tokens > max_length {self.cache.max_length}")
        window = window_for(length + 1, self.cache.max_length)
        self.hidden.copy_(hidden)
        self.position_ids.copy_(position_ids)
        self.offset.fill_(length)
        self.visible.zero_()
        self.visible[:, :length + 1].copy_(attention_mask)
        out = self._replay(window) if self.use_graph else self._forward(window)
        self.cache.advance(1)
        return out.clone()

    def _forward(self, window: int) -> torch.Tensor:
        span = self.span
        mask = self.visible[:, None, None, :window]
        if span.config._attn_implementation != "sdpa":  # eager attention takes an additive mask
            dtype = span.compute_dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        kwargs = dict(attention_mask=mask, position_ids=self.position_ids,
                      position_embeddings=span.position_module(self.hidden, self.position_ids),
                      cache=_OffsetWrites(self.cache, self.offset, window))
        hidden = self.hidden
        for block in span.blocks:
            hidden = span.family.run_block(block, hidden, kwargs)
        return hidden

    def _replay(self, window: int) -> torch.Tensor:
        if self._captured_keys is not self.cache.keys:  # beams reordered: the cache has new buffers
            self.graphs.clear()
            self._captured_keys = self.cache.keys
        if window not in self.graphs:
            self._capture(window)
        graph, output = self.graphs[window]
        graph.replay()
        return output

    def _capture(self, window: int) -> None:
        """Record one step over `window` slots; the warm-up run first does lazy initialisation outside the graph.

        Both write the current token's keys and values, which the replay then writes again.
        """
        device = self.hidden.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._forward(window)
        torch.cuda.current_stream(device).wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self._forward(window)
        self.graphs[window] = graph, output
        logger.info(f"captured a CUDA graph of a single-token step through {self.span.num_blocks} blocks "
                    f"over {window} cache slots")
