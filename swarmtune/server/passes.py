"""Forward and backward passes through the served blocks: training's stateless requests.

A forward may keep its autograd graph (`keep`) for the backward that follows, within the kept-graph
budget; a backward without one recomputes the forward.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from swarmtune import wire
from swarmtune.server import compute, working_memory
from swarmtune.server.admission import Gate
from swarmtune.server.executor import BACKWARD, FORWARD
from swarmtune.server.faults import Faults
from swarmtune.server.graphs import KeptGraphs
from swarmtune.server.lora import LoraSet
from swarmtune.server.requests import SpanRequest, need, parse_span_request
from swarmtune.server.served import MAX_POSITION, Served


class Passes:
    def __init__(self, served: Served, gate: Gate, graphs: KeptGraphs, faults: Faults, stats: defaultdict):
        self.served, self.gate, self.graphs, self.faults, self.stats = served, gate, graphs, faults, stats

    @property
    def memory(self) -> working_memory.WorkingMemory:
        return self.gate.executor.memory

    async def on_channel(self, meta: dict, tensors: dict, peer: str) -> bytes:
        method = meta.get("method")
        need(method in ("forward", "backward"), "a channel request's 'method' must be forward or backward")
        return await (self.forward if method == "forward" else self.backward)(meta, tensors, peer)

    def _parse(self, meta: dict, tensors: dict, peer: str, backward: bool) -> tuple[SpanRequest, LoraSet | None, int]:
        served = self.served
        req = parse_span_request(meta, tensors, served.blocks, served.num_blocks, served.hidden_size, MAX_POSITION,
                                 served.limits, backward=backward)
        lora = served.resolve_lora(peer, req.lora_meta, req.lora_tensors, req.start, req.end)
        seed = int(req.lora_meta.get("seed", 0)) if req.lora_meta else 0
        return req, lora, seed

    async def forward(self, meta: dict, tensors: dict, peer: str) -> bytes:
        req, lora, seed = self._parse(meta, tensors, peer, backward=False)
        await self.faults.wait()
        span, (batch, length) = self.served.subspan(req.start, req.end), req.hidden.shape[:2]
        args = (span, req.hidden, req.attention_mask, req.position_ids, req.deep_prompts, lora, seed)
        if req.keep is not None and self.graphs.wanted(compute.graph_bytes(span, req.hidden)):
            memory = self.memory.admit(span, working_memory.KEEPING, batch, length, 0, "a forward")
            graph, out = await self.gate.compute(peer, batch * length, length, FORWARD, memory, _forward_keeping,
                                                 *args)
            self.graphs.put((peer, req.keep, req.start, req.end), graph)
        else:
            memory = self.memory.admit(span, working_memory.FORWARD, batch, length, 0, "a forward")
            out = await self.gate.compute(peer, batch * length, length, FORWARD, memory, compute.forward, *args)
        self.stats["forward"] += 1
        return wire.pack({"ok": True}, {"hidden": self.faults.corrupt(out)})

    async def backward(self, meta: dict, tensors: dict, peer: str) -> bytes:
        req, lora, seed = self._parse(meta, tensors, peer, backward=True)
        await self.faults.wait()
        span, (batch, length) = self.served.subspan(req.start, req.end), req.hidden.shape[:2]
        graph = self.graphs.take((peer, req.keep, req.start, req.end)) if req.keep is not None else None
        if graph is not None and torch.equal(graph.received, req.hidden):  # the forward we kept: no recompute
            self.stats["backward_from_kept_graph"] += 1
            memory = self.memory.admit(span, working_memory.GRADIENTS, batch, length, 0, "a backward")
            grads = await self.gate.compute(peer, batch * length, length, BACKWARD, memory, compute.backward_through,
                                            graph, req.grad_output)
        else:
            memory = self.memory.admit(span, working_memory.BACKWARD, batch, length, 0, "a backward")
            grads = await self.gate.compute(peer, batch * length, length, BACKWARD, memory, compute.backward, span,
                                            req.hidden, req.attention_mask, req.position_ids, req.deep_prompts, lora,
                                            req.grad_output, seed)
        grad_hidden, grad_deep, grad_lora = grads
        tensors = {"grad_hidden": self.faults.corrupt(grad_hidden)}
        if grad_deep is not None:
            tensors["grad_deep_prompts"] = grad_deep
        if req.lora_meta is not None and "adapter" not in req.lora_meta:
            for i in range(len(grad_lora) // 2):
                tensors[f"grad.lora.A.{i}"], tensors[f"grad.lora.B.{i}"] = grad_lora[2 * i], grad_lora[2 * i + 1]
        self.stats["backward"] += 1
        return wire.pack({"ok": True}, tensors)


def _forward_keeping(*args) -> tuple[compute.Graph, torch.Tensor]:
    graph = compute.forward_with_graph(*args)
    return graph, compute.output_of(graph)
