"""The computations a server runs on its span, on the compute thread."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from swarmtune.models.span import SpanModel
from swarmtune.server import lora as lora_lib
from swarmtune.server.lora import LoraSet

Grads = tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]


def _seeded(lora: LoraSet | None, seed: int) -> LoraSet | None:
    """A LoRA set whose dropout draws the same masks in a forward and in its backward recomputation."""
    if lora is None or lora.dropout == 0:
        return lora
    generator = torch.Generator().manual_seed(seed)
    return LoraSet(lora.weights, lora.scale, lora.dropout, generator)


def forward(span: SpanModel, hidden, attention_mask, position_ids, deep_prompts, lora: LoraSet | None,
            seed: int = 0) -> torch.Tensor:
    dtype = span.compute_dtype
    device = next(span.parameters()).device
    with torch.inference_mode(), lora_lib.activate(_seeded(lora, seed)):
        out = span(hidden.to(device, dtype), _to(attention_mask, device), _to(position_ids, device),
                   deep_prompts=_to(deep_prompts, device, dtype))
    return out.to("cpu", hidden.dtype)


@dataclass
class Graph:
    """A forward pass kept with its autograd graph, so that its backward needs no recomputation."""

    received: torch.Tensor              # the hidden states as the request carried them
    output: torch.Tensor
    inputs: list[torch.Tensor]          # what gradients are taken for: hidden, deep prompts?, LoRA tensors
    has_deep_prompts: bool
    deep_prompts_dtype: torch.dtype | None
    nbytes: int
    created: float = field(default_factory=time.monotonic)


def forward_with_graph(span: SpanModel, hidden, attention_mask, position_ids, deep_prompts, lora: LoraSet | None,
                       seed: int = 0) -> Graph:
    """The span's forward with gradients enabled for its inputs, deep prompts and LoRA tensors."""
    dtype = span.compute_dtype
    device = next(span.parameters()).device
    weights = {t.untyped_storage().data_ptr() for t in (*span.parameters(), *span.buffers())}
    saved: dict[int, int] = {}  # what autograd keeps for the backward, by storage: the graph's real size

    def count(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        h = hidden.to(device, dtype).requires_grad_(True)
        p = _to(deep_prompts, device, dtype)
        if p is not None:
            p.requires_grad_(True)
        lora_tensors = []
        if lora is not None:
            trainable = {k: (a.detach().requires_grad_(True), b.detach().requires_grad_(True))
                         for k, (a, b) in lora.weights.items()}
            lora = LoraSet(trainable, lora.scale, lora.dropout)
            lora_tensors = lora.tensors()
        with lora_lib.activate(_seeded(lora, seed)):
            out = span(h, _to(attention_mask, device), _to(position_ids, device), deep_prompts=p)
    inputs = [h] + ([p] if p is not None else []) + lora_tensors
    count(out)
    return Graph(hidden, out, inputs, p is not None, deep_prompts.dtype if deep_prompts is not None else None,
                 sum(saved.values()))


def graph_bytes(span: SpanModel, hidden: torch.Tensor) -> int:
    """An upper estimate of what a forward graph will hold, known before running it: a dozen hidden-sized
    activations per block and token, and attention's [batch, heads, length, length] per block."""
    itemsize = torch.empty((), dtype=span.compute_dtype).element_size()
    batch, length = hidden.shape[:2]
    attention = batch * span.config.num_attention_heads * length * length
    return (12 * hidden.numel() + attention) * itemsize * span.num_blocks


def output_of(graph: Graph) -> torch.Tensor:
    return graph.output.detach().to("cpu", graph.received.dtype)


def backward_through(graph: Graph, grad_output: torch.Tensor) -> Grads:
    """Gradients w.r.t. the graph's hidden input, deep prompts and LoRA tensors (this frees the graph)."""
    out, inputs = graph.output, graph.inputs
    grads = torch.autograd.grad(out, inputs, grad_outputs=grad_output.to(out.device, out.dtype), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    grad_hidden = grads[0].to("cpu", graph.received.dtype)
    grad_deep = grads[1].to("cpu", graph.deep_prompts_dtype) if graph.has_deep_prompts else None
    return grad_hidden, grad_deep, [g.to("cpu", torch.float32) for g in grads[1 + graph.has_deep_prompts:]]


def backward(span: SpanModel, hidden, attention_mask, position_ids, deep_prompts, lora: LoraSet | None,
             grad_output, seed: int = 0) -> Grads:
    """Recompute the span's forward and return grads w.r.t. hidden, deep prompts and the LoRA tensors."""
    graph = forward_with_graph(span, hidden, attention_mask, position_ids, deep_prompts, lora, seed)
    return backward_through(graph, grad_output)


def _to(t: torch.Tensor | None, device, dtype=None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to(device, dtype) if dtype is not None else t.to(device)
