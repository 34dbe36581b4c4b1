"""Evaluation through the inference path: greedy generations scored against reference answers, and
response perplexity from forward passes through the swarm.

Used in two places: SwarmLM's validation (a fixed sample of validation prompts, decoded every N
validation runs, so progress is comparable across steps) and `python -m swarmtune.eval` (a whole
split). Generation goes through `SwarmForCausalLM.generate`, i.e. real inference sessions with the
adapter applied, so what is measured is what users of the adapter will get.
"""

from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger, WandbLogger
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from swarmtune.client.model import SwarmForCausalLM
from swarmtune.errors import check_positive
from swarmtune.tuning import dpo
from swarmtune.tuning.data import IGNORE, EvalExample

SAMPLE_COLUMNS = ["prompt", "reference", "generation", "exact_match"]


@dataclass
class EvalConfig:
    num_samples: int | None = field(default=8, metadata={"help": "the first N examples of the split; null: all"})
    max_new_tokens: int = 32
    batch_size: int = field(default=8, metadata={"help": "examples per inference session"})

    def __post_init__(self):
        check_positive(self, "num_samples", optional=True)
        check_positive(self, "max_new_tokens")
        check_positive(self, "batch_size")


# ---- scoring ----------------------------------------------------------------------------------------


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lowercase, no punctuation, no English articles, single spaces: "The sky is blue." == "sky is blue"."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(generation: str, reference: str) -> bool:
    return normalize(generation) == normalize(reference)


def score(examples: list[EvalExample], generations: list[str]) -> dict[str, float]:
    """The share of generations that equal their reference answer, normalised (empty without examples)."""
    if not examples:
        return {}
    hits = sum(exact_match(g, e.reference) for e, g in zip(examples, generations, strict=True))
    return {"exact_match": hits / len(examples)}


# ---- generation and perplexity -----------------------------------------------------------------------


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so every prompt's last token sits in the last column, where generation continues."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, longest - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, longest - len(seq):] = 1
    return ids, mask


@torch.no_grad()
def generate(model: SwarmForCausalLM, tokenizer: PreTrainedTokenizerBase, examples: list[EvalExample],
             max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy responses to `examples` through inference sessions, decoded up to the end-of-sequence token."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    responses = []
    for start in range(0, len(examples), batch_size):
        ids, mask = left_pad([e.input_ids for e in examples[start:start + batch_size]], pad_id)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        for row in out[:, ids.shape[1]:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            responses.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return responses


@torch.no_grad()
def response_nll(model: SwarmForCausalLM, loader: DataLoader) -> tuple[float, int]:
    """Summed next-token NLL over the labelled (response) tokens of every batch, and their count.

    Token-weighted, unlike a mean of per-batch losses, so the perplexity does not depend on batching.
    """
    total, count = 0.0, 0
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                              reduction="sum")
        total += float(nll)
        count += int((labels != IGNORE).sum())
    return total, count


@torch.no_grad()
def preference_scores(model: SwarmForCausalLM, loader: DataLoader, beta: float) -> dict[str, float]:
    """Over every pair of the batches: DPO's loss, the reward accuracy (how often the chosen answer gets the
    higher implicit reward beta * log(pi / pi_ref)), the reward margin and the mean rewards; pi has the
    model's adapter, pi_ref not. Means over pairs, so they do not depend on batching."""
    sums, pairs = {}, 0
    for batch in loader:
        loss, metrics = dpo.step(model, batch, beta)
        n = batch["input_ids"].shape[0] // 2
        for name, value in {"loss": loss, **metrics}.items():
            sums[name] = sums.get(name, 0.0) + float(value) * n
        pairs += n
    return {"pairs": pairs, **{name: total / max(pairs, 1) for name, total in sums.items()}}


def perplexity(nll: float, tokens: int) -> float:
    """exp of the mean token NLL (capped, so an untrained model gives a large number, not inf)."""
    return math.exp(min(nll / tokens, 50.0))


# ---- generation during validation ----------------------------------------------------------------------


@dataclass
class GenerationEval:
    """A fixed set of examples that SwarmLM decodes during validation, and how."""

    examples: list[EvalExample]
    tokenizer: PreTrainedTokenizerBase
    config: EvalConfig

    def run(self, model: SwarmForCausalLM) -> tuple[dict[str, float], list[dict]]:
        """(metrics, one sample row per prompt) for `model` as it is now."""
        generations = generate(model, self.tokenizer, self.examples, self.config.max_new_tokens,
                               self.config.batch_size)
        return score(self.examples, generations), sample_rows(self.examples, generations)


def sample_rows(examples: list[EvalExample], generations: list[str]) -> list[dict]:
    return [{"prompt": e.prompt, "reference": e.reference, "generation": g,
             "exact_match": exact_match(g, e.reference)}
            for e, g in zip(examples, generations, strict=True)]


def write_samples(path: str, rows: list[dict], step: int | None = None) -> None:
    """Append rows to a jsonl file, one per line, each with the training step when given."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row if step is None else {"step": step, **row}) + "\n")


def log_samples(logger: Logger | None, rows: list[dict], step: int, key: str = "val/samples") -> None:
    """A wandb table of prompts, references and generations; other loggers keep scalars only."""
    if isinstance(logger, WandbLogger):
        logger.log_table(key=key, columns=SAMPLE_COLUMNS, data=[[r[c] for c in SAMPLE_COLUMNS] for r in rows],
                         step=step)
