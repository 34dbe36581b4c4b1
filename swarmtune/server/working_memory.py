"""The working memory of the requests a server computes: their activations, reserved before they run.

A request's activations live only while it runs, but grow with its length: one 1x16384 forward of the
tiny test llama raised a server's RSS by 1.4 GB, mostly attention's [length x positions] masks and
scores, and a backward keeps every block's activations at once. So each computation's working memory is
estimated from the model family's shapes before it runs (`estimate`: an upper bound, checked against
measured peaks in tests/test_hostile_clients.py) and reserved from a server-wide budget while it runs,
charged to its peer.

The compute threads run one request per lane (server.executor): the short lane, for cheap requests, runs
within SHORT_PART of the budget and the long lane within the rest, so the two never wait for each other's
memory and the reservations never exceed the budget. A request that fits neither lane's part is the
client's error, refused before it is queued with the longest request that would fit; one that fits
waits in its lane's queue like any other.

The budget's default (`auto_bytes`) is the share of the device's free memory that the blocks and the KV
cache leave to activations (1 - throughput.MEMORY_FRACTION of what was free before loading); the
server's --working-memory-mb overrides it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from swarmtune.models.span import SpanModel
from swarmtune.server.requests import RequestError
from swarmtune.server.throughput import MEMORY_FRACTION

SHORT_PART = 8  # the short lane runs within 1/SHORT_PART of the budget, the long lane within the rest
MASK_BYTES = 12  # per (query, key) pair and batch row: the boolean mask, its float form and their temporaries
FORWARD, BACKWARD, KEEPING, GRADIENTS = "forward", "backward", "keeping", "gradients"  # kinds of computation


@dataclass(frozen=True)
class Shapes:
    """Values per token that one block holds at its peak, and per (query, key) pair, from the config."""

    hidden: int      # the residual stream
    attention: int   # queries, keys and values (expanded to every head), and attention's output
    mlp: int         # the MLP's intermediates: the widest of the dense MLP and the routed experts (plus shared ones)
    scores: int      # per (query, key) pair and batch row: heads x 2 (scores, softmax) for eager, 0 for SDPA

    @staticmethod
    def of(config: PretrainedConfig) -> Shapes:
        hidden = config.hidden_size
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        if getattr(config, "kv_lora_rank", None):  # MLA: compressed latents, expanded to every head after the cache
            qk = config.qk_nope_head_dim + config.qk_rope_head_dim
            attention = ((config.q_lora_rank or 0) + config.kv_lora_rank + config.qk_rope_head_dim
                         + 2 * heads * qk + 2 * heads * config.v_head_dim)
        else:  # grouped keys and values: eager attention repeats them for every head
            head_dim = getattr(config, "head_dim", None) or hidden // heads
            attention = 4 * heads * head_dim
        dense = getattr(config, "intermediate_size", None) or 4 * hidden  # bloom: 4 x hidden
        experts = (getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
                   or getattr(config, "n_routed_experts", None) or 0)
        mlp = 3 * dense
        if experts:
            expert = getattr(config, "moe_intermediate_size", None) or dense
            top_k = getattr(config, "num_experts_per_tok", None) or 1
            shared = ((getattr(config, "n_shared_experts", None) or 0) * expert
                      + (getattr(config, "shared_expert_intermediate_size", None) or 0))
            mlp = max(mlp, 3 * (top_k * expert + shared) + experts)
        scores = 0 if config._attn_implementation == "sdpa" else 2 * heads
        return Shapes(hidden, attention, mlp, scores)


def estimate(span: SpanModel, kind: str, batch: int, length: int, context: int) -> int:
    """Bytes a computation on `span` holds at its peak beyond its weights: `batch` x `length` new tokens, each
    attending to `context` positions. A forward holds one block's activations at a time (and the span's input
    and output); a backward, or a forward that keeps its graph, every block's, then a block's gradients;
    the gradients of a kept graph (whose own bytes the kept-graph budget holds) a block's gradients."""
    shapes = Shapes.of(span.config)
    itemsize = torch.empty((), dtype=span.compute_dtype).element_size()
    tokens, pairs = batch * length, batch * length * context
    transient = (tokens * (7 * shapes.hidden + max(shapes.attention, shapes.mlp)) * itemsize
                 + pairs * (shapes.scores * 4 + MASK_BYTES))  # eager softmax runs in float32
    if kind in (FORWARD, GRADIENTS):
        return transient * (1 if kind == FORWARD else 2)
    kept = span.num_blocks * (tokens * (6 * shapes.hidden + shapes.attention + shapes.mlp) * itemsize
                              + pairs * (shapes.scores * itemsize + 4))
    return kept + 2 * transient


def auto_bytes(free_before_loading: int) -> int:
    """The default budget: what the blocks and KV cache leave of the device's free memory (throughput's share)."""
    return int(free_before_loading * (1 - MEMORY_FRACTION))


class WorkingMemory:
    """The server-wide budget. Reserved and released on the compute threads, read from the event loop: locked."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self.by_peer: dict[str, int] = {}
        self._lock = threading.Lock()

    def lane_bytes(self, short: bool) -> int:
        """The part of the budget that one lane's running request may hold."""
        return self.max_bytes // SHORT_PART if short else self.max_bytes - self.max_bytes // SHORT_PART

    def admit(self, span: SpanModel, kind: str, batch: int, length: int, past: int, what: str) -> int:
        """The working memory of a computation (`estimate`, at `past` positions before its own), or the client's
        error when no lane could run it, naming the longest request of its kind that would fit."""
        nbytes = estimate(span, kind, batch, length, past + length)
        limit = self.lane_bytes(short=False)
        if nbytes <= limit:
            return nbytes
        lo, hi = 0, length  # estimates grow with length: the longest that fits lies in [lo, hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if estimate(span, kind, batch, mid, past + mid) <= limit else (lo, mid)
        fix = f"send at most {batch}x{lo} tokens per request" if lo else "this server takes none of its size"
        raise RequestError(f"{what} of {batch}x{length} tokens needs about {nbytes >> 20} MiB of working memory, "
                           f"more than this server lets one request hold ({limit >> 20} MiB): {fix}")

    def reserve(self, peer: str, nbytes: int) -> None:
        with self._lock:
            self.used += nbytes
            self.by_peer[peer] = self.by_peer.get(peer, 0) + nbytes

    def release(self, peer: str, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes
            self.by_peer[peer] -= nbytes
            if not self.by_peer[peer]:
                del self.by_peer[peer]
