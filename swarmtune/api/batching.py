"""Continuous batching over the swarm: many requests' decoding steps as one batched inference session.

A `Batcher` keeps one `InferenceSession` whose rows are slots. Each step feeds every busy row
the tokens it has not fed yet, right-aligned: a decoding row its last token, a new request its
whole prompt, the rest of the step's width masked out. So requests join and leave between any
two steps, with their own prompt lengths and positions, and the servers run one batched step
where separate sessions would run one per request. A finished request's row goes to the next
one with `InferenceSession.reset_rows`, which hides what the row saw before.

Masked positions still take cache space. When the cache would overflow, or more requests wait
than the session has rows, the batcher opens a fresh session (up to `max_rows` rows, a power of
two) and feeds each busy row everything it has so far, in one prefill step: the same tokens
continue. Server failures are the session's to recover, as in any generation.

With a draft model, each step is also a speculative round: every row feeds its unfed tokens plus
up to k tokens its draft proposed, the logits at all of them come back in the same step, and
each row keeps the drafts that speculative sampling's rule accepts (greedy: those equal to the
target's argmax) and one token more. `InferenceSession.rollback` then hides each row's rejected
drafts and drops the columns no row kept. k follows the measured acceptance rate and costs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable

import torch

from swarmtune.adapters.lora import ClientLora
from swarmtune.adapters.prompts import SoftPrompts
from swarmtune.client.connection import SwarmConnection
from swarmtune.client.inference import InferenceSession
from swarmtune.client.speculative import DraftCache, DraftLength, accept
from swarmtune.models import ClientParts

logger = logging.getLogger(__name__)

IDLE_WAIT = 1.0  # seconds the batching thread sleeps between checks when nothing is running


@dataclasses.dataclass
class Sampling:
    """How one sequence picks its tokens (OpenAI's parameters)."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # alternatives reported per token (0: only the chosen token's logprob)
    echo: bool = False           # also report the prompt's tokens with their logprobs (the first has none)


@dataclasses.dataclass
class Token:
    """One generated token, as the batcher reports it."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token id, logprob), best first


class Sequence:
    """One sequence to generate: a prompt, how to sample, and where its tokens go.

    `emit(event)` is called from the batching thread: with `echo`, first the prompt's tokens (a list of
    `Token`, the first without logprob); then each generated `Token`; then a finish reason ("stop" or
    "length") or an exception. It must not block. `cancel()` frees the row at the next step.
    """

    def __init__(self, prompt: list[int], sampling: Sampling, eos: set[int], emit: Callable[[object], None]):
        self.prompt, self.sampling, self.eos, self.emit = list(prompt), sampling, eos, emit
        self.generated: list[int] = []
        self.fed = 0  # tokens of prompt + generated in the session's cache (soft prompt positions not counted)
        self.drafted: list[int] = []               # this step's draft tokens, fed after the unfed ones
        self.draft_probs: list[torch.Tensor] = []  # the distributions they were drawn from
        self.draft: DraftCache | None = None
        self.cancelled = False
        self.scored = False  # the prompt's logprobs were reported (echo)
        self.generator = torch.Generator()
        if sampling.seed is not None:
            self.generator.manual_seed(sampling.seed)
        else:
            self.generator.seed()

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    def cancel(self) -> None:
        self.cancelled = True


@dataclasses.dataclass
class Variant:
    """What a request's `model` selects: the base model, a client-owned adapter or a server-hosted one."""

    name: str
    lora: ClientLora | None = None
    soft_prompts: SoftPrompts | None = None  # shallow prompts only: deep prompts live in a session's rows
    lm_head: torch.Tensor | None = None      # the weight of the adapter's own LM head, if it trained one
    hosted: str | None = None                # an adapter servers host, by name


class Batcher:
    """A thread that runs every sequence submitted for one `Variant` through one shared session."""

    def __init__(self, connection: SwarmConnection, parts: ClientParts, variant: Variant, max_rows: int = 16,
                 max_length: int = 2048, draft: torch.nn.Module | None = None):
        self.connection, self.parts, self.variant = connection, parts, variant
        self.draft = draft  # a small local causal LM sharing the tokenizer, for speculative rounds
        self.draft_length = DraftLength() if draft is not None else None
        self.max_rows, self.max_length = max_rows, max_length
        self.prefix = variant.soft_prompts.length if variant.soft_prompts is not None else 0
        self.waiting: queue.Queue[Sequence] = queue.Queue()
        self.rows: list[Sequence | None] = []
        self.session: InferenceSession | None = None
        self.steps = 0
        self._fresh: set[int] = set()  # rows given to a new sequence since the last step
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"batcher-{variant.name}", daemon=True)
        self._thread.start()

    def capacity(self) -> int:
        """The longest prompt plus max_tokens one sequence may have."""
        return self.max_length - self.prefix

    def submit(self, sequence: Sequence) -> None:
        if len(sequence.prompt) + sequence.sampling.max_tokens > self.capacity():
            raise ValueError(f"prompt ({len(sequence.prompt)} tokens) plus max_tokens "
                             f"({sequence.sampling.max_tokens}) exceeds the context of {self.capacity()} tokens")
        self.waiting.put(sequence)
        self._wake.set()

    def close(self, timeout: float = 30.0) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)

    # ---- the batching thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closing:
            self._drop_cancelled()
            self._admit()
            if not any(self.rows):  # idle: the next request starts a session sized for what waits then
                self._close_session()
                self.rows = []
                self._wake.wait(IDLE_WAIT)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as e:  # the swarm failed this step for good: every running sequence ends with it
                logger.warning(f"batched step failed: {e}")
                for row, seq in enumerate(self.rows):
                    if seq is not None:
                        seq.emit(e)
                        self.rows[row] = None
                self._close_session()
        self._close_session()
        for seq in [*filter(None, self.rows), *_drain(self.waiting)]:
            seq.emit(RuntimeError("the server is shutting down"))

    def _drop_cancelled(self) -> None:
        for row, seq in enumerate(self.rows):
            if seq is not None and seq.cancelled:
                self.rows[row] = None

    def _admit(self) -> None:
        """Give waiting sequences free rows; a bigger session if they do not fit."""
        waiting = [s for s in _drain(self.waiting) if not s.cancelled]
        busy = [s for s in self.rows if s is not None]
        free = len(self.rows) - len(busy)
        if len(waiting) > free and len(self.rows) < self.max_rows:
            self._reopen(busy, rows=min(self.max_rows, 2 ** math.ceil(math.log2(len(busy) + len(waiting)))))
        for seq in waiting:
            row = next((i for i, s in enumerate(self.rows) if s is None), None)
            if row is None:
                self.waiting.put(seq)  # still no room: it waits for a row to finish
                continue
            self.rows[row] = seq
            seq.fed = 0
            self._fresh.add(row)

    def _reopen(self, busy: list[Sequence], rows: int) -> None:
        """A fresh session of `rows` rows; busy sequences keep their place in line and feed all they have."""
        self._close_session()
        self.rows = [*busy, *[None] * (rows - len(busy))]
        for seq in busy:
            seq.fed = 0

    def _close_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        self._fresh.clear()

    def _step(self) -> None:
        """Feed every busy row what it has not fed yet (and its drafts), and pick each one's next tokens."""
        drafting = time.perf_counter()
        self._propose()
        width = self._width()
        if self.session is not None and self.session.length + width > self.max_length:
            self._reopen([s for s in self.rows if s is not None], rows=len(self.rows))
            width = self._width()
        if self.session is None:
            v = self.variant
            self.session = InferenceSession(self.connection, self.max_length, len(self.rows), lora=v.lora,
                                            active_adapter=v.hosted)
            self._fresh.clear()  # a new session has no history to hide
        if self._fresh:
            fresh = torch.zeros(len(self.rows), dtype=torch.bool)
            fresh[list(self._fresh)] = True
            self.session.reset_rows(fresh)
            self._fresh.clear()
        hidden, mask, positions = self._inputs(width)
        stepping = time.perf_counter()
        with torch.no_grad():
            out = self.session.step(self.parts.prepare_hidden(hidden), mask, positions)
            busy = [(row, seq) for row, seq in enumerate(self.rows) if seq is not None]
            last = torch.cat([out[row, width - len(seq.drafted) - 1:] for row, seq in busy])  # each row's k + 1
            logits = self._logits(last)
            for row, seq in busy:
                if seq.sampling.echo and not seq.scored:  # fed its whole prompt in this step
                    end = width - len(seq.drafted)
                    seq.emit(self._score_prompt(seq, out[row, end - len(seq.prompt):end - 1]))
                    seq.scored = True
        self.steps += 1
        keep = torch.full((len(self.rows),), self.session.length, dtype=torch.long)
        offset = 0
        for row, seq in busy:
            n = len(seq.drafted) + 1
            kept = self._advance(row, seq, logits[offset:offset + n])
            keep[row] -= len(seq.drafted) - kept
            offset += n
        if self.draft_length is not None:
            k = max(len(seq.drafted) for _, seq in busy)
            prefill = width > k + 1  # some row fed a prompt too
            self.draft_length.timed(k, stepping - drafting, None if prefill else time.perf_counter() - stepping)
        if bool((keep < self.session.length).any()):
            self.session.rollback(keep)

    def _propose(self) -> None:
        """Each busy row's draft tokens for this step (none without a draft model)."""
        k = self.draft_length.next if self.draft_length is not None else 0
        for seq in self.rows:
            if seq is None:
                continue
            room = min(k, seq.sampling.max_tokens - len(seq.generated) - 1)
            seq.drafted, seq.draft_probs = [], []
            if room > 0:
                if seq.draft is None:
                    seq.draft = DraftCache(self.draft)
                seq.drafted, seq.draft_probs = seq.draft.propose(
                    seq.tokens, room, lambda _, logits, seq=seq: draw(logits, seq.sampling, seq.generator))

    def _width(self) -> int:
        return max(len(s.tokens) - s.fed + len(s.drafted) + (self.prefix if s.fed == 0 else 0)
                   for s in self.rows if s is not None)

    def _inputs(self, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings [rows, width, hidden], mask and positions: each row's new tokens at the right end."""
        embed = self.parts.embed_tokens
        rows = len(self.rows)
        hidden = torch.zeros(rows, width, embed.embedding_dim, dtype=embed.weight.dtype)
        mask = torch.zeros(rows, width, dtype=torch.long)
        positions = torch.zeros(rows, width, dtype=torch.long)
        with torch.no_grad():
            for row, seq in enumerate(self.rows):
                if seq is None:
                    continue
                new = embed(torch.tensor(seq.tokens[seq.fed:] + seq.drafted))
                start = self.prefix + seq.fed if seq.fed else 0  # positions in the row's own sequence
                if seq.fed == 0 and self.prefix:
                    new = torch.cat([self.variant.soft_prompts.prompt.to(new.dtype), new])
                n = new.shape[0]
                hidden[row, width - n:] = new
                mask[row, width - n:] = 1
                positions[row, width - n:] = torch.arange(start, start + n)
        return hidden, mask, positions

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.variant.lm_head
        return (self.parts.logits(hidden) if head is None
                else torch.nn.functional.linear(self.parts.final_norm(hidden), head)).float()

    def _score_prompt(self, seq: Sequence, hidden: torch.Tensor, chunk: int = 256) -> list[Token]:
        """The prompt's tokens with their logprobs given what precedes them, from the outputs [len - 1, hidden]
        at every prompt position but the last; vocabulary-wide logits for `chunk` positions at a time."""
        scored = [Token(seq.prompt[0])]
        for begin in range(0, hidden.shape[0], chunk):
            logits = self._logits(hidden[begin:begin + chunk])
            for i, row in enumerate(logits):
                scored.append(describe(seq.prompt[begin + i + 1], row, seq.sampling))
        return scored

    def _advance(self, row: int, seq: Sequence, logits: torch.Tensor) -> int:
        """Pick and report the row's next tokens from its logits [drafts + 1, vocab]; free the row when the
        sequence is done. Returns how many of the drafts were kept (in the cache: the rest is rolled back)."""
        seq.fed = len(seq.tokens)
        if seq.sampling.max_tokens == 0:  # echo of the prompt alone
            seq.emit("length")
            self.rows[row] = None
            return 0
        if seq.drafted:
            target = torch.stack([probabilities(x, seq.sampling) for x in logits])
            tokens = accept(seq.drafted, seq.draft_probs, target, seq.generator)
            self.draft_length.observe(len(seq.drafted), len(tokens) - 1)
        else:
            tokens = [draw(logits[0], seq.sampling, seq.generator)[0]]
        kept = len(tokens) - 1
        seq.fed += kept
        for i, token in enumerate(tokens):
            seq.generated.append(token)
            seq.emit(describe(token, logits[i], seq.sampling))
            if token in seq.eos or len(seq.generated) >= seq.sampling.max_tokens:
                seq.emit("stop" if token in seq.eos else "length")
                self.rows[row] = None
                break
        return kept


def probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution a token is drawn from: one-hot at temperature 0, else temperature and nucleus (top_p)."""
    if sampling.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).float()
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < sampling.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        probs = probs / probs.sum()
    return probs


def draw(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> tuple[int, torch.Tensor]:
    """The next token from [vocab] logits, and the distribution it came from."""
    probs = probabilities(logits, sampling)
    if sampling.temperature == 0:
        return int(probs.argmax()), probs
    return int(torch.multinomial(probs, 1, generator=generator)), probs


def describe(token: int, logits: torch.Tensor, sampling: Sampling) -> Token:
    """The token as reported, with the model's own logprobs (before temperature and top_p) if asked for."""
    if sampling.logprobs is None:
        return Token(token)
    logprobs = torch.log_softmax(logits, dim=-1)
    top = []
    if sampling.logprobs > 0:
        values, ids = torch.topk(logprobs, min(sampling.logprobs, logprobs.numel()))
        top = [(int(i), float(v)) for i, v in zip(ids, values)]
    return Token(token, float(logprobs[token]), top)


def _drain(q: queue.Queue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
