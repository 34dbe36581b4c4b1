"""Client side of generation: an inference session over a chain of servers, with the dual attention cache.

Servers keep the KV caches (server-side cache); the client keeps every input it has sent to
each span (client-side cache). When a server fails mid-session, the client routes its blocks
to other servers, replays the stored inputs there to rebuild their caches, and carries on: the
generated tokens are the same as without the failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import secrets
import statistics
import time

import torch

from swarmtune import transport, wire
from swarmtune.adapters.lora import ClientLora
from swarmtune.client.connection import SwarmConnection
from swarmtune.client.routing import Hop, inference_route
from swarmtune.client.span_requests import Refusals, alternatives, ban_failed, check_output, vote, wait_for_route
from swarmtune.directory import SwarmView
from swarmtune.records import ServerInfo
from swarmtune.transport import MessageStream, ServerFailure

logger = logging.getLogger(__name__)
CHAIN_BYTES = 256 << 10  # steps up to this size are pushed server to server (a push is a single RPC frame)


class _History:
    """What one span received so far, [batch, length, hidden] (its client-side cache).

    Kept in a buffer that doubles when full, so that a step appends in place instead of copying
    the whole history (megabytes per token at a 70B model's hidden size).
    """

    def __init__(self, first: torch.Tensor | None = None):
        self.buffer, self.length = None, 0
        if first is not None:
            self.append(first)

    @property
    def data(self) -> torch.Tensor | None:
        return self.buffer[:, :self.length] if self.buffer is not None else None

    def append(self, x: torch.Tensor) -> None:
        end = self.length + x.shape[1]
        if self.buffer is None or end > self.buffer.shape[1]:
            grown = x.new_empty(x.shape[0], max(end, 2 * self.length), x.shape[2])
            if self.buffer is not None:
                grown[:, :self.length] = self.buffer[:, :self.length]
            self.buffer = grown
        self.buffer[:, self.length:end] = x
        self.length = end

    def reorder(self, index: torch.Tensor) -> None:
        if self.buffer is not None:
            self.buffer = self.buffer[index]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


@dataclasses.dataclass
class _Edits:
    """Changes to a server's cache that go out with the next step to that server (see the server's CacheEdits)."""

    reorder: torch.Tensor | None = None   # beam search: row i continues the old row reorder[i]
    truncate: int | None = None           # the cache's length before the step's tokens
    keep: torch.Tensor | None = None      # [batch]: each row's entries from keep[row] on are hidden
    reset: torch.Tensor | None = None     # [batch] bool: rows whose earlier tokens are hidden

    def tensors(self) -> dict[str, torch.Tensor]:
        hides = self.keep is not None and bool((self.keep < self.truncate).any())  # else truncating says it all
        named = {"reorder": self.reorder, "keep": self.keep if hides else None,
                 "reset": self.reset.nonzero().flatten() if self.reset is not None else None}
        return {name: t for name, t in named.items() if t is not None}


class _SpanSession:
    """This client's session with one server for blocks [hop.start, hop.end)."""

    def __init__(self, session: InferenceSession, hop: Hop, history: _History, upstream: str | None = None):
        self.session, self.hop, self.history = session, hop, history
        self.upstream = upstream  # the server before this one in the chain: the one given our push key
        self.edits = _Edits()  # to send with the next step
        self.stream = MessageStream(session.connection.p2p, hop.peer_id, session.connection.token)
        self.shadows: list[_SpanSession] = []  # other servers running the same blocks, to verify this one
        self.session_id = secrets.token_hex(16)  # names this session to the previous server's pushes
        self.push_key = secrets.token_hex(16)  # what authorises them: given only to that server, anew if it changes
        self.awaiting = False  # a chained step was sent whose reply is still unread
        self.trace: list[int] | None = None  # the server's timestamps of the last step, when the session traces

    def open(self) -> None:
        s, timeout = self.session, self.session.config.connect_timeout

        def request(lora_meta: dict | None, lora_tensors: dict[str, torch.Tensor]) -> None:
            meta = {"type": "open", "start": self.hop.start, "end": self.hop.end, "max_length": s.max_length,
                    "batch_size": s.batch_size, "session_id": self.session_id, "push_key": self.push_key}
            if lora_meta is not None:
                meta["lora"] = lora_meta
            tensors = dict(lora_tensors)
            if s.deep_prompts is not None:
                tensors["deep_prompts"] = s.deep_prompts[self.hop.start:self.hop.end].expand(-1, s.batch_size, -1, -1)
            data = wire.pack(meta, tensors)
            s.bytes_sent += len(data)
            if self.stream.closed:  # a refused open ends its stream
                self.stream = MessageStream(s.connection.p2p, self.hop.peer_id, s.connection.token)
            s.connection.run(self.stream.exchange(data, timeout), timeout=timeout + 5)

        s.connection.lora_shipments.send(request, self.hop, s.lora, s.active_adapter)  # no dropout in generation

    def step(self, hidden: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, step: int) -> torch.Tensor:
        """This span's output for new tokens (checked against the shadows, if any)."""
        out = self.send(hidden, mask, position_ids, step)
        return self._verified(out, hidden, mask, position_ids, step) if self.shadows else out

    def send(self, hidden: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, step: int) -> torch.Tensor:
        s = self.session
        timeout = s.config.step_timeout
        if self.awaiting:  # a chained step is in flight, but its push will not come: deliver the input ourselves
            self.awaiting = False
            meta, reply = s.connection.run(self._push_and_receive(hidden, step, timeout), timeout=timeout + 5)
            if not meta.get("need_hidden"):  # computed, from our push (or the previous server's, if it came)
                return self.output(reply, hidden)
        data = self.message({"step": step}, mask, position_ids, hidden)
        _, reply = s.connection.run(self.stream.exchange(data, timeout), timeout=timeout + 5)
        return self.output(reply, hidden)

    async def _push_and_receive(self, hidden: torch.Tensor, step: int, timeout: float) -> tuple[dict, dict]:
        """Put the input where the server waits for the previous server's push, then read its reply."""
        data = wire.pack({"session": self.session_id, "key": self.push_key, "step": step}, {"hidden": hidden})
        with contextlib.suppress(ServerFailure):  # if this fails, the server asks for the input when its wait ends
            await transport.call(self.stream.p2p, self.hop.peer_id, "push", data, timeout, token=self.stream.token)
        return await self.stream.receive(timeout)

    def message(self, meta: dict, mask: torch.Tensor, position_ids: torch.Tensor,
                hidden: torch.Tensor | None) -> bytes:
        """A step message; without `hidden`, the server takes it from the previous server's push."""
        tensors = {"attention_mask": mask, "position_ids": position_ids, **self.edits.tensors()}
        if hidden is not None:
            tensors["hidden"] = hidden
        if self.edits.truncate is not None:
            meta = {**meta, "truncate": self.edits.truncate}
        if self.session.trace:
            meta = {**meta, "trace": True}
        data = wire.pack(meta, tensors)
        self.session.bytes_sent += len(data)
        return data

    def output(self, reply: dict, like: torch.Tensor) -> torch.Tensor:
        """The span's output from a step reply, checked."""
        out = check_output(self.hop.peer_id, reply.get("hidden"), like.shape, "hidden")
        self.edits = _Edits()
        return out.to(like)

    def _verified(self, out, hidden, mask, position_ids, step: int) -> torch.Tensor:
        """Compare with the shadows; without agreement more servers vote, and the outvoted are dropped."""
        s = self.session
        replicas = {self.hop.peer_id: self}
        results = {self.hop.peer_id: out}
        for shadow in list(self.shadows):
            try:
                results[shadow.hop.peer_id] = shadow.send(hidden, mask, position_ids, step)
                replicas[shadow.hop.peer_id] = shadow
            except ServerFailure as e:
                self.shadows.remove(shadow)
                shadow.close()
                s.ban(shadow.hop, e, count=False)

        def ask_another(asked: set[str]) -> tuple[ServerInfo, torch.Tensor] | None:
            while (replica := s.open_replica(self.hop, exclude=asked, history=self.history)) is not None:
                try:
                    result = replica.send(hidden, mask, position_ids, step)
                except ServerFailure as e:
                    replica.close_stream()
                    s.ban(replica.hop, e, count=False)
                    asked = asked | {replica.hop.peer_id}
                    continue
                replicas[replica.hop.peer_id] = replica
                return replica.hop.server, result
            return None

        try:
            winner, losers = vote(results, {p: r.hop.server for p, r in replicas.items()}, s.connection.bans,
                                  f"an inference step of blocks {self.hop.start}:{self.hop.end}", ask_another)
        except ServerFailure:  # no majority: this span is replaced, with none of these servers
            for replica in replicas.values():
                if replica is not self:
                    replica.close_stream()
            raise
        s.mismatches += len(losers)
        for peer in losers:
            replicas[peer].close_stream()
        if winner != self.hop.peer_id:  # this span continues on the winner's connection
            other = replicas[winner]
            self.stream, other.stream = other.stream, self.stream
            self.hop, other.hop = other.hop, self.hop
            self.edits, other.edits = other.edits, self.edits
        self.shadows = [r for r in replicas.values() if r is not self and r.hop.peer_id not in losers]
        return results[winner]

    def close_stream(self) -> None:
        self.session.connection.loop.call_soon_threadsafe(self.stream.close)

    def close(self) -> None:
        for shadow in self.shadows:
            shadow.close_stream()
        self.close_stream()


class InferenceSession:
    """Generation state for one batch across the swarm; `step` runs new tokens' hidden states through all blocks."""

    def __init__(self, connection: SwarmConnection, max_length: int, batch_size: int, lora: ClientLora | None = None,
                 deep_prompts: torch.Tensor | None = None, active_adapter: str | None = None, start: int = 0,
                 end: int | None = None):
        self.connection, self.config = connection, connection.config
        self.max_length, self.batch_size = max_length, batch_size
        self.lora, self.deep_prompts, self.active_adapter = lora, deep_prompts, active_adapter
        self.start, self.end = start, connection.view.num_blocks if end is None else end
        self.spans: list[_SpanSession] = []
        self.mask: torch.Tensor | None = None          # [batch, length] of every token so far
        self.positions: torch.Tensor | None = None     # [batch, length]
        self.length = 0
        self.steps = 0
        self.bytes_sent = 0
        self.recoveries: list[float] = []
        self.mismatches = 0
        self._failures, self._refusals = 0, Refusals()
        self.closed = False
        self.trace = False  # servers note when each step arrived, computed and replied (benchmarks.step)

    # ---- public API ------------------------------------------------------------------------------

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of `hidden.shape[1]` new tokens after all blocks; `attention_mask` covers the new tokens."""
        if self.closed:
            raise RuntimeError("the inference session is closed")
        batch, new = hidden.shape[:2]
        if batch != self.batch_size:
            raise ValueError(f"session was opened for batch {self.batch_size}, got {batch}")
        if self.length + new > self.max_length:
            raise ValueError(f"session max_length {self.max_length} exceeded ({self.length} + {new} tokens)")
        mask = attention_mask if attention_mask is not None else torch.ones(batch, new, dtype=torch.long)
        if position_ids is None:
            position_ids = torch.arange(self.length, self.length + new).expand(batch, new)
        mask, position_ids = mask.long().cpu(), position_ids.long().cpu()
        self._failures, self._refusals = 0, Refusals()
        if not self.spans:
            self._open_chain(self.start, self.end, 0, _History())
        h, index = hidden.detach().cpu(), 0
        if not any(s.shadows for s in self.spans):
            h, index = self._fast_step(h, mask, position_ids, chained=self.chainable(h))
        while index < len(self.spans):  # what the fast path left: recovery, verification
            span = self.spans[index]
            try:
                out = span.step(h, mask, position_ids, self.steps)
            except ServerFailure as e:
                self._recover(index, e)
                continue
            span.history.append(h)
            h, index = out, index + 1
        self.mask = mask if self.mask is None else torch.cat([self.mask, mask], dim=1)
        self.positions = position_ids if self.positions is None else torch.cat([self.positions, position_ids], 1)
        self.length += new
        self.steps += 1
        return h.to(hidden)  # back to the caller's device: local parts may sit on a GPU

    def view(self) -> SwarmView:
        """The servers this session may use: those hosting its adapter, if it names one."""
        return self.connection.view.hosting(self.active_adapter)

    def chainable(self, hidden: torch.Tensor) -> bool:
        """Servers pass small steps along the chain themselves when the network is the bottleneck;
        large steps (prefills), verified chains and fast links go through the client."""
        if len(self.spans) < 2 or hidden.numel() * hidden.element_size() > CHAIN_BYTES:
            return False
        if self.config.chaining is not None:
            return self.config.chaining
        rtts = [self.connection.min_rtts.get(s.hop.peer_id) for s in self.spans]  # the links, not the load
        return all(r is not None for r in rtts) and statistics.median(rtts) >= self.config.chain_min_rtt

    def _fast_step(self, h: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, chained: bool
                   ) -> tuple[torch.Tensor, int]:
        """Run a step through all spans in one go on the network thread, chained server to server
        (one network trip per hop instead of a round trip) or relayed by the client.

        Returns the output so far and the index of the first span still to run (len(spans) when
        done); a failed span is recovered and the rest of the step falls back to the client path.
        """
        run = self._chain if chained else self._relay
        outputs, error = self.connection.run(run(h, mask, position_ids),
                                             timeout=len(self.spans) * (self.config.step_timeout + 5))
        done = len(outputs)
        inputs = [h, *outputs]
        for span, x in zip(self.spans[:done], inputs):
            span.history.append(x)
        if error is not None:
            self._recover(done, error)
        return inputs[done], done

    async def _relay(self, h, mask, position_ids) -> tuple[list[torch.Tensor], ServerFailure | None]:
        """Send each span its input and wait for its output, in order: (outputs so far, the failure or None)."""
        outputs = []
        for span in self.spans:
            try:
                data = span.message({"step": self.steps}, mask, position_ids, outputs[-1] if outputs else h)
                meta, reply = await span.stream.exchange(data, self.config.step_timeout)
                span.trace = meta.get("trace")
                outputs.append(span.output(reply, h))
            except ServerFailure as e:
                return outputs, e
        return outputs, None

    async def _chain(self, h, mask, position_ids) -> tuple[list[torch.Tensor], ServerFailure | None]:
        """Announce the step to every span, then collect outputs in order: (outputs so far, the
        failure of the next span or None). Spans left `awaiting` have a reply still to read."""
        spans, step, timeout = self.spans, self.steps, self.config.step_timeout
        try:
            for i, span in enumerate(spans):
                meta = {"step": step, "await_push": i > 0, "push_wait": self.config.push_wait}
                if i > 0 and span.upstream != spans[i - 1].hop.peer_id:  # a recovery changed the server before
                    span.upstream, span.push_key = spans[i - 1].hop.peer_id, secrets.token_hex(16)  # it: a new key
                    meta["push_key"] = span.push_key
                if i + 1 < len(spans):
                    following = spans[i + 1]
                    meta["push_to"] = {"peer": following.hop.peer_id, "session": following.session_id,
                                       "key": following.push_key}
                await span.stream.send(span.message(meta, mask, position_ids, h if i == 0 else None))
                span.awaiting = True
        except ServerFailure:
            return [], None  # the client path will meet (and recover from) this failure
        outputs = []
        for span in spans:
            try:
                span.awaiting = False
                meta, reply = await span.stream.receive(timeout)
                if meta.get("need_hidden"):  # the push did not come in time: send the input ourselves
                    data = span.message({"step": step}, mask, position_ids, outputs[-1] if outputs else h)
                    meta, reply = await span.stream.exchange(data, timeout)
                outputs.append(span.output(reply, h))
            except ServerFailure as e:
                return outputs, e
        return outputs, None

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row i continues the old row index[i] (sent to each server with its next step)."""
        index = index.long().cpu()
        for span in self.spans:
            for replica in [span, *span.shadows]:
                edits = replica.edits
                edits.reorder = index if edits.reorder is None else edits.reorder[index]
                edits.keep = edits.keep[index] if edits.keep is not None else None
                edits.reset = edits.reset[index] if edits.reset is not None else None
            span.history.reorder(index)
        if self.mask is not None:
            self.mask, self.positions = self.mask[index], self.positions[index]

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Forget what rows `rows` ([batch] bool) saw so far: their later tokens attend only to each other.

        The cache keeps its length (those positions stay, hidden by the mask), so a batch of many
        requests can give a finished request's row to a new one within the same session.
        """
        rows = rows.bool().cpu()
        for span in self.spans:
            for replica in [span, *span.shadows]:
                edits = replica.edits
                edits.reset = rows if edits.reset is None else edits.reset | rows
        if self.mask is not None:
            self.mask = self.mask.masked_fill(rows[:, None], 0)

    def rollback(self, keep: int | torch.Tensor) -> None:
        """Forget the newest tokens (speculative decoding's rejected drafts): each row keeps its first `keep`
        positions (an int, or [batch] ints), and the session continues from the longest kept row.

        Positions a row drops but another keeps stay in the cache, hidden from that row by the mask.
        Each server drops the same with the next step; a replay after a failure sends only what is kept.
        """
        keep = torch.as_tensor(keep, dtype=torch.long).cpu().expand(self.batch_size).clone()
        if not bool(((keep >= 0) & (keep <= self.length)).all()):
            raise ValueError(f"rollback needs 0 <= keep <= {self.length} (the session's length), got {keep.tolist()}")
        length = int(keep.max()) if keep.numel() else 0
        if self.mask is not None:
            columns = torch.arange(self.length)
            self.mask = self.mask.masked_fill(columns >= keep[:, None], 0)[:, :length]
            self.positions = self.positions[:, :length]
        for span in self.spans:
            span.history.truncate(length)
            for replica in [span, *span.shadows]:
                edits = replica.edits  # a second rollback before the next step hides what either hid
                edits.keep = keep if edits.keep is None else torch.minimum(edits.keep, keep)
                edits.truncate = length
        self.length = length

    def close(self) -> None:
        if not self.closed:
            for span in self.spans:
                span.close()
            self.closed = True

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- routing and recovery --------------------------------------------------------------------

    def _open_chain(self, start: int, end: int, index: int, history: _History) -> int:
        """Open sessions on a fresh chain for blocks [start, end) at position `index`; returns its length."""
        connection = self.connection
        deadline = time.monotonic() + self.config.retry_budget
        while True:  # each failed open is banned and counted: `ban` gives up after max_retries
            hops = wait_for_route(
                lambda: inference_route(self.view(), start, end, connection.bans, connection.rtts.get),
                connection.refresh, deadline, connection.prefix, self.active_adapter)
            opened = []
            for i, hop in enumerate(hops):
                upstream = hops[i - 1] if i else self.spans[index - 1].hop if index else None
                span = _SpanSession(self, hop, history if i == 0 else _History(),
                                    upstream.peer_id if upstream is not None else None)
                try:
                    span.open()
                except ServerFailure as e:
                    for other in opened:
                        other.close()
                    self.ban(hop, e)
                    break
                connection.bans.served(hop.peer_id)
                opened.append(span)
            else:
                for span in opened:
                    if self.config.verify_fraction > 0 and random.random() < self.config.verify_fraction:
                        shadow = self.open_replica(span.hop, exclude={span.hop.peer_id}, history=None)
                        span.shadows += [shadow] if shadow is not None else []
                self.spans[index:index] = opened
                return len(opened)

    def open_replica(self, hop: Hop, exclude: set[str], history: _History | None) -> _SpanSession | None:
        """A session for exactly hop's blocks on another server, its cache rebuilt from `history` if given."""
        view, bans = self.view(), self.connection.bans
        candidates = [s for s in view.covering(hop.start, bans) if s.end >= hop.end and s.peer_id not in exclude]
        for server in random.sample(candidates, len(candidates)):
            replica = _SpanSession(self, Hop(server, hop.start, hop.end), _History())
            try:
                replica.open()
                if history is not None and history.data is not None:
                    replica.send(history.data, self.mask, self.positions, -1)
                return replica
            except ServerFailure as e:
                replica.close_stream()
                self.ban(replica.hop, e, count=False)
        return None

    def ban(self, hop: Hop, error: ServerFailure, count: bool = True) -> None:
        """Ban a failed server. Failures of the chain `count` toward the step's retry limit; a
        verifier's do not, since the chain itself still works."""
        if count:
            self._failures += 1
            if self._failures > self.config.max_retries:
                raise RuntimeError(f"inference step failed {self._failures} times; giving up (last: {error})")
        ban_failed(self.connection.bans, hop, error, "an inference session")
        if count:
            self._refusals.check(error, alternatives(self.view(), hop, self.connection.bans))

    def _replace(self, index: int, error: ServerFailure) -> int:
        old = self.spans.pop(index)
        old.close()
        self.ban(old.hop, error)
        return self._open_chain(old.hop.start, old.hop.end, index, old.history)

    def _recover(self, index: int, error: ServerFailure) -> None:
        """Replace span `index` (its server failed) and rebuild the replacements' caches from its history."""
        failed_at = time.monotonic()
        old_hop = self.spans[index].hop
        count = self._replace(index, error)
        if self.length > 0:
            self._replay(index, count)
        took = time.monotonic() - failed_at
        self.recoveries.append(took)
        logger.warning(f"blocks {old_hop.start}:{old_hop.end} moved to "
                       f"{', '.join(str(s.hop) for s in self.spans[index:index + count])}; "
                       f"replayed {self.length} tokens in {took:.2f} s")

    def _replay(self, first: int, count: int) -> None:
        """Feed the stored inputs of span `first` through the `count` new spans in one prefill step."""
        h, i, last = self.spans[first].history.data, first, first + count
        while i < last:
            span = self.spans[i]
            if i > first:
                span.history = _History(h)
            try:
                out = span.step(h, self.mask, self.positions, -1)
            except ServerFailure as e:
                last += self._replace(i, e) - 1
                continue
            h, i = out, i + 1
