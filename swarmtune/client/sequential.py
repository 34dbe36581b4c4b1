"""All remote blocks as one autograd-aware module, with fault-tolerant replay.

Forward walks the chain span by span, keeping each span's input. If a server fails (no answer,
timeout, error reply, wrong shape or non-finite output), it is banned for a while and only that
span is re-run on other servers. Backward asks each span's server for gradients w.r.t. its
input, deep prompts and LoRA tensors, recomputing the span's forward there; if that server is
gone, the span is re-routed (possibly over several servers) and replayed from its saved input.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from swarmtune import wire
from swarmtune.adapters.lora import ClientLora
from swarmtune.client.connection import SwarmConnection
from swarmtune.client.routing import Hop, training_route
from swarmtune.client.span_requests import (
    Refusals,
    alternatives,
    ban_failed,
    check_output,
    vote,
    wait_for_route,
)
from swarmtune.records import ServerInfo
from swarmtune.transport import ServerFailure

logger = logging.getLogger(__name__)


@dataclass
class SpanArgs:
    """What every span request carries besides the hidden states."""

    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    deep_prompts: torch.Tensor | None = None   # [num_blocks, batch, prefix, hidden]
    lora: ClientLora | None = None
    seed: int = 0
    offset: int = 0                            # the block that deep_prompts[0] belongs to
    active_adapter: str | None = None          # a server-hosted adapter, used instead of client LoRA
    keep: str | None = None                    # ask servers to keep forward graphs for the backward, by this id

    def tensors(self, start: int, end: int) -> dict[str, torch.Tensor]:
        out = {}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        if self.deep_prompts is not None:
            out["deep_prompts"] = self.deep_prompts[start - self.offset:end - self.offset]
        return out


@dataclass
class TransferStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    lora_bytes_sent: int = 0
    requests: int = 0
    failures: int = 0
    mismatches: int = 0
    replays: list[float] = field(default_factory=list)


class Replayer:
    """Runs span requests over the swarm, re-routing around failed servers within a retry budget."""

    def __init__(self, connection: SwarmConnection, rng: random.Random | None = None):
        self.connection = connection
        self.config = connection.config
        self.rng = rng or random.Random()
        self.stats = TransferStats()
        self.last_route: list[Hop] = []  # the hops of the latest forward pass

    # ---- one request to one server ----------------------------------------------------------------

    def call_span(self, method: str, hop: Hop, hidden: torch.Tensor, args: SpanArgs,
                  grad_output: torch.Tensor | None = None, keep: bool = True) -> dict[str, torch.Tensor]:
        """One forward or backward request; raises ServerFailure."""
        def request(lora_meta: dict | None, lora_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            meta = {"method": method, "start": hop.start, "end": hop.end}
            if args.keep is not None and keep:
                meta["keep"] = args.keep
            if lora_meta is not None:
                meta["lora"] = lora_meta
            tensors = {"hidden": self._to_wire(hidden), **args.tensors(hop.start, hop.end), **lora_tensors}
            if grad_output is not None:
                tensors["grad_output"] = self._to_wire(grad_output)
            data = wire.pack(meta, tensors)
            self.stats.bytes_sent += len(data)
            self.stats.lora_bytes_sent += sum(t.numel() * t.element_size() for t in lora_tensors.values())
            self.stats.requests += 1
            _, reply = self.connection.run(
                self.connection.channel(hop.peer_id).request(data, self.config.request_timeout),
                timeout=self.config.request_timeout + 5)
            self.stats.bytes_received += sum(t.numel() * t.element_size() for t in reply.values())
            return reply

        lora = args.lora
        return self.connection.lora_shipments.send(request, hop, lora, args.active_adapter,
                                                   lora.dropout if lora is not None else 0.0, args.seed)

    def checked_call(self, method: str, hop: Hop, hidden: torch.Tensor, args: SpanArgs,
                     grad_output: torch.Tensor | None = None) -> tuple[Hop, dict[str, torch.Tensor]]:
        """A request whose output is checked for shape and finiteness and, for a `verify_fraction`
        of requests, against other servers; returns the hop whose result is kept, and that result."""
        key = "hidden" if method == "forward" else "grad_hidden"
        reply = self.call_span(method, hop, hidden, args, grad_output)
        check_output(hop.peer_id, reply.get(key), hidden.shape, key)
        if not (self.config.verify_fraction > 0 and self.rng.random() < self.config.verify_fraction):
            return hop, reply
        view, bans = self.connection.view.hosting(args.active_adapter), self.connection.bans
        replies, servers = {hop.peer_id: reply}, {hop.peer_id: hop.server}

        def ask_another(asked: set[str]) -> tuple[ServerInfo, torch.Tensor] | None:
            others = [s for s in view.covering(hop.start, bans) if s.end >= hop.end and s.peer_id not in asked]
            for server in self.rng.sample(others, len(others)):
                other = Hop(server, hop.start, hop.end)
                try:
                    other_reply = self.call_span(method, other, hidden, args, grad_output, keep=False)
                    check_output(server.peer_id, other_reply.get(key), hidden.shape, key)
                except ServerFailure as e:
                    self.fail(other, e, f"{method} verification", Refusals(), args.active_adapter)
                    continue
                replies[server.peer_id] = other_reply
                return server, other_reply[key]
            return None

        winner, losers = vote({hop.peer_id: reply[key]}, servers, bans, f"{method} of blocks {hop.start}:{hop.end}",
                              ask_another)
        self.stats.mismatches += len(losers)
        return Hop(servers[winner], hop.start, hop.end), replies[winner]

    def _to_wire(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.config.wire_dtype
        return t.detach().to(getattr(torch, dtype)) if dtype else t.detach()

    # ---- routing with retries ---------------------------------------------------------------------

    def next_hop(self, block: int, end: int, deadline: float, active_adapter: str | None = None) -> Hop:
        """The first hop of a fresh training route from `block`, waiting (bounded) for servers to appear."""
        connection = self.connection
        return wait_for_route(
            lambda: training_route(connection.view.hosting(active_adapter), block, end, connection.bans, self.rng,
                                   self.config.routing_randomness)[0],
            connection.refresh, deadline, connection.prefix, active_adapter)

    def fail(self, hop: Hop, error: ServerFailure, what: str, refusals: Refusals,
             active_adapter: str | None = None) -> None:
        """Ban the server; stop retrying if servers agree the request itself is invalid."""
        self.stats.failures += 1
        bans = self.connection.bans
        ban_failed(bans, hop, error, what)
        refusals.check(error, alternatives(self.connection.view.hosting(active_adapter), hop, bans))

    def run_span(self, method: str, block: int, end: int, hidden: torch.Tensor, args: SpanArgs,
                 grad_output: torch.Tensor | None = None, prefer: Hop | None = None) -> tuple[Hop, dict]:
        """Run `method` on some server for a span starting at `block`, retrying on other servers.

        With `prefer`, that exact hop is tried first (backward wants the forward's servers).
        """
        deadline = time.monotonic() + self.config.retry_budget
        failed_at, refusals = None, Refusals()
        for attempt in range(self.config.max_retries):
            use_preferred = prefer is not None and attempt == 0
            hop = prefer if use_preferred else self.next_hop(block, end, deadline, args.active_adapter)
            try:
                hop, reply = self.checked_call(method, hop, hidden, args, grad_output)
                self.connection.bans.forgive(hop.peer_id)
                if failed_at is not None:
                    took = time.monotonic() - failed_at
                    self.stats.replays.append(took)
                    logger.warning(f"replayed blocks {hop.start}:{hop.end} on {hop.peer_id} in {took:.2f} s")
                return hop, reply
            except ServerFailure as e:
                failed_at = failed_at or time.monotonic()
                self.fail(hop, e, method, refusals, args.active_adapter)
        raise RuntimeError(f"blocks {block}:{end}: {self.config.max_retries} attempts failed; giving up")


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, replayer: Replayer, start: int, end: int, args: SpanArgs, hidden: torch.Tensor,
                deep_prompts: torch.Tensor | None, *lora_params: torch.Tensor) -> torch.Tensor:
        inputs, hops = [], []
        h, block = hidden.detach(), start
        while block < end:
            hop, reply = replayer.run_span("forward", block, end, h, args)
            inputs.append(h)
            hops.append(hop)
            h = reply["hidden"].to(hidden.dtype)
            block = hop.end
        ctx.replayer, ctx.args, ctx.hops, ctx.inputs = replayer, args, hops, inputs
        replayer.last_route = list(hops)
        ctx.has_deep_prompts, ctx.num_lora = deep_prompts is not None, len(lora_params)
        return h.to(hidden.device)  # hops ran on the host; local parts may sit on a GPU

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        replayer, args = ctx.replayer, ctx.args
        grad_deep = torch.zeros_like(args.deep_prompts) if ctx.has_deep_prompts else None
        grad_lora = {key: [torch.zeros_like(p) for p in args.lora.pair(key)] for key in args.lora.keys} \
            if ctx.num_lora else {}
        grad = grad_output.contiguous()
        for hop, h in zip(reversed(ctx.hops), reversed(ctx.inputs)):
            grad = _backward_span(replayer, hop.start, hop.end, h, grad, args, grad_deep, grad_lora, prefer=hop)
        lora_grads = [g for key in args.lora.keys for g in grad_lora[key]] if ctx.num_lora else []
        return (None, None, None, None, grad.to(grad_output), grad_deep, *lora_grads)


def _backward_span(replayer: Replayer, start: int, end: int, h: torch.Tensor, grad: torch.Tensor, args: SpanArgs,
                   grad_deep: torch.Tensor | None, grad_lora: dict, prefer: Hop | None) -> torch.Tensor:
    """Gradient w.r.t. the input of blocks [start, end), accumulating prompt and LoRA gradients.

    Tries `prefer` (the forward's server) first. If the best replacement covers only part of the
    span, the span is split there: the first part is replayed forward from the saved input to
    recover the activations at the split, and each part is back-propagated on its own.
    """
    deadline = time.monotonic() + replayer.config.retry_budget
    refusals = Refusals()
    for _ in range(replayer.config.max_retries):
        usable = prefer is not None and not replayer.connection.bans.banned(prefer.peer_id, prefer.server.expires)
        hop = prefer if usable else replayer.next_hop(start, end, deadline, args.active_adapter)
        prefer = None
        if hop.end < end:
            first, fwd = replayer.run_span("forward", start, hop.end, h, args, prefer=hop)
            grad = _backward_span(replayer, first.end, end, fwd["hidden"].to(h), grad, args, grad_deep,
                                  grad_lora, prefer=None)
            return _backward_span(replayer, start, first.end, h, grad, args, grad_deep, grad_lora, prefer=first)
        try:
            hop, reply = replayer.checked_call("backward", hop, h, args, grad)
            _accumulate(hop, reply, args, grad_deep, grad_lora)
        except ServerFailure as e:
            replayer.fail(hop, e, "backward", refusals, args.active_adapter)
            continue
        replayer.connection.bans.forgive(hop.peer_id)
        return reply["grad_hidden"].to(h)
    raise RuntimeError(f"blocks {start}:{end}: {replayer.config.max_retries} backward attempts failed; giving up")


def _accumulate(hop: Hop, reply: dict, args: SpanArgs, grad_deep: torch.Tensor | None, grad_lora: dict) -> None:
    if grad_deep is not None:
        mine = grad_deep[hop.start - args.offset:hop.end - args.offset]
        name = "grad_deep_prompts"
        mine += check_output(hop.peer_id, reply.get(name), mine.shape, name).to(mine)
    if args.lora is not None:
        for i, key in enumerate(args.lora.keys_in(hop.start, hop.end)):
            for j, ab in enumerate("AB"):
                mine, name = grad_lora[key][j], f"grad.lora.{ab}.{i}"
                mine += check_output(hop.peer_id, reply.get(name), mine.shape, name).to(mine)


class RemoteSequential(nn.Module):
    """Blocks [start, end) of the swarm's model as a module: hidden states in, hidden states out."""

    def __init__(self, connection: SwarmConnection, start: int = 0, end: int | None = None,
                 rng: random.Random | None = None):
        super().__init__()
        self.connection = connection
        self.start = start
        self.end = connection.view.num_blocks if end is None else end
        self.replayer = Replayer(connection, rng)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, deep_prompts: torch.Tensor | None = None,
                lora: ClientLora | None = None, active_adapter: str | None = None) -> torch.Tensor:
        """`active_adapter` names a server-hosted adapter (then `lora` must be None: hosted adapters are not
        trained)."""
        if active_adapter is not None and lora is not None:
            raise ValueError("use either client LoRA or a server-hosted adapter, not both")
        lora_params = lora.flat_parameters(lora.keys) if lora is not None else []
        backward_follows = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, deep_prompts, *lora_params))
        args = SpanArgs(attention_mask, position_ids, deep_prompts, lora, seed=random.getrandbits(31),
                        offset=self.start, active_adapter=active_adapter,
                        keep=secrets.token_hex(8) if backward_follows else None)
        return _RemoteBlocks.apply(self.replayer, self.start, self.end, args, hidden, deep_prompts, *lora_params)
