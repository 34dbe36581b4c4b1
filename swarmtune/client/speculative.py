"""Speculative decoding over the swarm: a small local draft proposes tokens, one swarm step checks them all.

A step through the chain of servers costs at least a network round trip, whatever its number of
tokens, while a draft model on the client costs little per token. So one trip can yield several
tokens: the draft proposes k, the swarm computes the target's logits at all k + 1 positions in one
step, the longest agreeing prefix is kept (plus the target's own next token), and every server's
cache drops the rest (`InferenceSession.rollback`). Greedy output is the target's own; sampling
uses speculative sampling's acceptance rule, so the output distribution is the target's too.

`DraftLength` picks k from what it measures: the draft's acceptance rate, the draft's cost per
token and the swarm step's cost (mostly the round trip). `SwarmDraft` plugs it into transformers'
assisted generation, which `SwarmForCausalLM.generate(assistant_model=...)` runs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, PreTrainedModel
from transformers.generation.candidate_generator import CandidateGenerator


class DraftLength:
    """How many tokens to draft next: the k that maximizes expected tokens per second.

    With a per-token acceptance rate `a`, drafting k tokens yields (1 - a^(k+1)) / (1 - a) tokens
    per round (the accepted drafts and the target's own next token) and costs k draft steps plus
    one swarm step, whose time is fitted as a line in its number of tokens over recent rounds.
    k = 0 is plain decoding; then every `probe_every` rounds k = 1 checks whether the draft
    became worth it. k stays within [min_tokens, max_tokens] (equal: a fixed length). Recent rounds
    weigh more (`decay`), so k follows a changing text or network.
    """

    def __init__(self, max_tokens: int = 16, initial: int = 4, min_tokens: int = 0, decay: float = 0.9,
                 probe_every: int = 8):
        if not 0 <= min_tokens <= initial <= max_tokens:
            raise ValueError(f"draft lengths need 0 <= min_tokens ({min_tokens}) <= initial ({initial}) <= "
                             f"max_tokens ({max_tokens})")
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.decay, self.probe_every = decay, probe_every
        self.next = initial
        self.accepted, self.trials = 1.0, 2.0   # a prior of one acceptance in two
        self.draft_seconds: float | None = None  # per drafted token
        self.steps: deque[tuple[int, float]] = deque(maxlen=32)  # (tokens in the swarm step, seconds)
        self.rounds_plain = 0
        self.rounds = 0
        self.drafted_total = self.accepted_total = self.refused_total = 0

    @property
    def acceptance(self) -> float:
        """The recent per-token acceptance rate (a draft is tried only if the one before it was kept)."""
        return self.accepted / self.trials

    @property
    def acceptance_total(self) -> float:
        """The per-token acceptance rate over every round so far."""
        return self.accepted_total / max(1, self.accepted_total + self.refused_total)

    def observe(self, drafted: int, accepted: int) -> None:
        """One sequence's round: `accepted` of its `drafted` tokens were kept."""
        self.drafted_total += drafted
        self.accepted_total += accepted
        self.refused_total += 1 if accepted < drafted else 0
        if drafted:
            self.accepted = self.decay * self.accepted + accepted
            self.trials = self.decay * self.trials + accepted + (1 if accepted < drafted else 0)

    def timed(self, drafted: int, draft_seconds: float, step_seconds: float | None) -> None:
        """One round's costs: drafting `drafted` tokens (per sequence) took `draft_seconds`, and the swarm step
        (drafted + 1 tokens per sequence) `step_seconds`, None if it also fed a prompt (a prefill says nothing
        about a decoding step's cost); then the next round's length is chosen."""
        self.rounds += 1
        if drafted:
            per_token = draft_seconds / drafted
            self.draft_seconds = per_token if self.draft_seconds is None else 0.8 * self.draft_seconds + 0.2 * per_token
        if step_seconds is not None:
            self.steps.append((drafted + 1, step_seconds))
        self.next = self._choose()

    def _step_cost(self) -> tuple[float, float]:
        """(seconds per swarm step, seconds per token in it), least squares over recent rounds."""
        tokens = torch.tensor([n for n, _ in self.steps], dtype=torch.float64)
        seconds = torch.tensor([t for _, t in self.steps], dtype=torch.float64)
        if len(set(tokens.tolist())) < 2:
            return float(seconds.mean()), 0.0
        dt = tokens - tokens.mean()
        slope = max(0.0, float((dt * (seconds - seconds.mean())).sum() / (dt ** 2).sum()))
        return max(0.0, float(seconds.mean() - slope * tokens.mean())), slope

    def _choose(self) -> int:
        if self.draft_seconds is None or not self.steps:
            return self.next
        a = min(self.acceptance, 0.999)
        fixed, per_token = self._step_cost()

        def rate(k: int) -> float:
            return ((1 - a ** (k + 1)) / (1 - a)) / (k * self.draft_seconds + fixed + per_token * (k + 1))

        best = max(range(self.min_tokens, self.max_tokens + 1), key=rate)
        if best == 0:
            self.rounds_plain += 1
            return 1 if self.rounds_plain % self.probe_every == 0 else 0
        self.rounds_plain = 0
        return best


Choose = Callable[[list[int], torch.Tensor], tuple[int, torch.Tensor]]


class DraftCache:
    """A draft model's KV cache for one sequence, kept across rounds and cut back to what still holds.

    The draft runs its own decoding loop rather than a `generate()` call per round, whose setup
    alone costs more than a tiny draft's forward passes.
    """

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds

    @torch.no_grad()
    def propose(self, tokens: list[int], k: int, choose: Choose) -> tuple[list[int], list[torch.Tensor]]:
        """`k` draft tokens to follow `tokens`, each picked by `choose(tokens so far, draft logits)`, which
        returns the token and the distribution (or scores) it was drawn from; those come back beside them."""
        common = next((i for i, (a, b) in enumerate(zip(self.cached, tokens)) if a != b),
                      min(len(self.cached), len(tokens)))
        common = min(common, len(tokens) - 1)  # at least one token to feed
        if common < len(self.cached):
            self.cache.crop(common - len(self.cached))
        self.cached = tokens[:common]
        feed, sequence = tokens[common:], list(tokens)
        drafted, dists = [], []
        for _ in range(k):
            ids = torch.tensor([feed], device=self.model.device)
            logits = self.model(input_ids=ids, cache=self.cache, use_cache=True).logits[0, -1].float().cpu()
            self.cached += feed
            token, dist = choose(sequence, logits)
            drafted.append(token)
            dists.append(dist)
            sequence.append(token)
            feed = [token]
        return drafted, dists


def accept(drafted: list[int], draft_probs: list[torch.Tensor], target_probs: torch.Tensor,
           generator: torch.Generator | None) -> list[int]:
    """Speculative sampling's rule: the tokens to emit, the kept drafts and one more from the target.

    `target_probs` [len(drafted) + 1, vocab] are the target's distributions after each prefix;
    `draft_probs` the draft's, which its tokens were drawn from. Draft i is kept with probability
    min(1, p(x) / q(x)); the first one refused is replaced by a draw from max(0, p - q), renormalized;
    if all are kept, one more comes from the target's last distribution. The emitted tokens are then
    distributed exactly as the target's own samples (Leviathan et al., 2023). With one-hot
    distributions (greedy) it keeps drafts while they equal the target's argmax.
    """
    out = []
    for i, token in enumerate(drafted):
        p, q = target_probs[i], draft_probs[i]
        u = float(torch.rand((), generator=generator))
        if u * float(q[token]) <= float(p[token]) and float(p[token]) > 0:
            out.append(token)
            continue
        residual = (p - q).clamp(min=0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p
        out.append(int(torch.multinomial(dist, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(target_probs[len(drafted)], 1, generator=generator)))
    return out


class SwarmDraft(CandidateGenerator):
    """A local draft model proposing tokens for transformers' assisted generation, `DraftLength` tokens a round.

    Its logits go through the target's logits processors (temperature, top-p, ...), so a sampled draft
    token comes from the same processed distribution that speculative sampling's rule divides by.
    """

    def __init__(self, draft: PreTrainedModel, generation_config: GenerationConfig,
                 logits_processor: LogitsProcessorList, draft_length: DraftLength):
        self.draft, self.draft_length = DraftCache(draft), draft_length
        self.sample = bool(generation_config.do_sample)
        self.max_length = generation_config.max_length
        self.processors = logits_processor
        self._drafted, self._draft_seconds, self._drafted_at = 0, 0.0, 0.0
        self._first_round = draft_length.rounds

    @property
    def num_drafting_tokens(self) -> int:
        """The most tokens one round drafts (transformers asks, to size what caches keep for rollback)."""
        return self.draft_length.max_tokens

    def _choose(self, sequence: list[int], logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        scores = self.processors(torch.tensor([sequence]), logits[None])[0]
        token = int(torch.multinomial(scores.softmax(-1), 1)) if self.sample else int(scores.argmax())
        return token, scores

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, torch.Tensor | None]:
        if input_ids.shape[0] != 1:
            raise ValueError("speculative decoding generates one sequence at a time (batch size 1)")
        started = time.perf_counter()
        k = max(0, min(self.draft_length.next, self.max_length - input_ids.shape[1] - 1))
        drafted, scores = self.draft.propose(input_ids[0].tolist(), k, self._choose) if k else ([], [])
        self._drafted, self._drafted_at = k, time.perf_counter()
        self._draft_seconds = self._drafted_at - started
        candidates = torch.cat([input_ids, torch.tensor([drafted], dtype=input_ids.dtype, device=input_ids.device)], 1)
        return candidates, torch.stack(scores)[None].to(input_ids.device) if scores else None

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        self.draft_length.observe(self._drafted, int(num_matches))
        prefill = self.draft_length.rounds == self._first_round  # this call's first round also fed the prompt
        self.draft_length.timed(self._drafted, self._draft_seconds,
                                None if prefill else time.perf_counter() - self._drafted_at)
