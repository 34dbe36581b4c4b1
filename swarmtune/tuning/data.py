"""Fine-tuning data: HF datasets in, padded or packed token batches out.

Three formats. `instruction`: each row is rendered with a prompt template and a response template
(Python format strings over the row's columns). `messages`: each row is a conversation, rendered with
the chat template (see swarmtune.tuning.chat). `preference`: each row a prompt with a chosen and a
rejected answer, for DPO; a batch of N pairs is 2N rows, the chosen answers first. Labels cover
what the model must learn to write (the response, the assistant turns, the answers), so it learns to
answer rather than to repeat the instructions. Batches are right-padded (the loss ignores padding),
or packed into fixed-length rows without padding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import resources

import lightning as L
import torch
from datasets import Dataset, DatasetDict, load_dataset
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from swarmtune.errors import UserError, check_file, check_positive, check_source
from swarmtune.tuning import chat

FORMATS = ("instruction", "messages", "preference")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE = -100


@dataclass
class DataConfig:
    path: str = field(metadata={"help": "hub dataset id, local file (json, jsonl, csv, parquet) or directory, "
                                        "or pkg://package/file"})
    name: str | None = field(default=None, metadata={"help": "hub dataset configuration"})
    split: str = field(default="train", metadata={"help": "the split to train on"})
    revision: str | None = field(default=None, metadata={"help": "hub dataset revision"})
    format: str = field(default="instruction", metadata={
        "help": "instruction: prompt/response templates over columns; messages: conversations (OpenAI messages "
                "or ShareGPT conversations) through the chat template; preference: prompt, chosen, rejected "
                "(strings or messages), for tuning.objective=dpo"})
    chat_template: str | None = field(default=None, metadata={
        "help": "a jinja file to render conversations with; null: the tokenizer's chat template"})
    prompt_template: str = field(default="{prompt}", metadata={"help": "format string over a row's columns"})
    response_template: str = field(default="{response}", metadata={"help": "format string over a row's columns"})
    train_on_prompt: bool = field(default=False, metadata={"help": "labels cover the prompt too"})
    add_bos: bool = True
    add_eos: bool = True
    max_length: int = field(default=512, metadata={"help": "tokens per row; longer rows are cut"})
    packing: bool = field(default=False, metadata={"help": "concatenate rows into rows of exactly max_length"})
    batch_size: int = 8
    eval_batch_size: int | None = field(default=None, metadata={"help": "null: batch_size"})
    val_split: str | None = field(default=None, metadata={"help": "a split to validate on; null: hold out "
                                                                  "val_fraction of the training split"})
    val_fraction: float = 0.05
    max_val_samples: int | None = None
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    num_proc: int | None = field(default=None, metadata={"help": "processes for tokenizing"})
    cache_dir: str | None = None

    def __post_init__(self):
        for name in ("max_length", "batch_size"):
            check_positive(self, name)
        check_positive(self, "eval_batch_size", optional=True)
        check_positive(self, "max_val_samples", optional=True)
        check_positive(self, "num_proc", optional=True)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is unknown: use one of {', '.join(FORMATS)}")
        if self.format == "preference" and self.packing:
            raise ValueError("packing joins rows, and a preference pair must stay whole: set packing=false")
        if self.chat_template is not None and self.format == "instruction":
            raise ValueError("chat_template renders formats messages and preference: set format, or drop it")


def resolve_path(path: str) -> str:
    """``pkg://swarmtune.assets/tiny_instruct.jsonl`` -> the file inside the installed package."""
    if not path.startswith("pkg://"):
        return path
    package, _, name = path[len("pkg://"):].partition("/")
    return str(resources.files(package).joinpath(name))


def check_data_path(path: str) -> None:
    """Fail fast on a data path that is neither here nor shaped like a hub dataset id."""
    check_source(resolve_path(path), "data.path", files=True)


def load_checked(cfg: DataConfig) -> DatasetDict:
    """The dataset, with every row of the splits used checked against `cfg.format`: a malformed row is
    a UserError naming it and its field, before anything slow starts."""
    check_data_path(cfg.path)
    if cfg.chat_template is not None:
        check_file(cfg.chat_template, "data.chat_template")
    raw = load_raw(cfg)
    for split in dict.fromkeys(s for s in (cfg.split, cfg.val_split) if s is not None):
        if split not in raw:
            raise UserError(f"data: the dataset has no split {split!r}: use one of {list(raw)}")
        check_rows(raw[split], cfg.format, split)
    return raw


def check_rows(rows: Dataset, format: str, split: str) -> None:
    parse = {"messages": chat.conversation, "preference": chat.pair}.get(format)
    if parse is None:  # instruction rows are columns for format strings
        return
    for i, row in enumerate(rows):
        try:
            parse(row)
        except chat.RowError as e:
            raise UserError(f"data: row {i} of split {split!r}: {e} (data.format={format})") from None


def load_raw(cfg: DataConfig) -> DatasetDict:
    """The dataset's splits: from local files by extension, else from the hub by name."""
    path = resolve_path(cfg.path)
    if os.path.isfile(path):
        builder = FILE_BUILDERS.get(os.path.splitext(path)[1])
        if builder is None:
            raise ValueError(f"Unsupported data file {path}: use one of {', '.join(FILE_BUILDERS)}")
        return load_dataset(builder, data_files={"train": path}, cache_dir=cfg.cache_dir)
    return load_dataset(path, cfg.name, revision=cfg.revision, cache_dir=cfg.cache_dir)


def train_val_split(raw: DatasetDict, cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    train = raw[cfg.split]
    if cfg.val_split is not None:
        val = raw[cfg.val_split]
    else:
        parts = train.train_test_split(test_size=cfg.val_fraction, seed=seed)
        train, val = parts["train"], parts["test"]
    if cfg.max_val_samples is not None and len(val) > cfg.max_val_samples:
        val = val.select(range(cfg.max_val_samples))
    return train, val


@dataclass
class EvalExample:
    """A row as generation sees it: the prompt tokenized exactly as in training, and its reference answer."""

    prompt: str
    input_ids: list[int]
    reference: str           # the rendered response


def encode_prompt(row: dict, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> list[int]:
    prompt = tokenizer.encode(cfg.prompt_template.format_map(row), add_special_tokens=False)
    if cfg.add_bos and tokenizer.bos_token_id is not None:
        prompt = [tokenizer.bos_token_id] + prompt
    return prompt


def eval_example(row: dict, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> EvalExample:
    """The prompt as training renders it (for conversations: the turns before the last assistant turn, with
    the generation prompt; for pairs: the prompt), and the reference answer (the last assistant turn; the
    chosen answer)."""
    if cfg.format == "instruction":
        return EvalExample(cfg.prompt_template.format_map(row), encode_prompt(row, tokenizer, cfg),
                           cfg.response_template.format_map(row))
    if cfg.format == "messages":
        turns = chat.conversation(row)
        last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=len(turns))
        prompt, answer = turns[:last], turns[last:last + 1]
    else:
        p = chat.pair(row)
        if not p.conversational:
            prompt = cfg.prompt_template.format_map({**row, "prompt": p.prompt})
            return EvalExample(prompt, encode_prompt({**row, "prompt": p.prompt}, tokenizer, cfg), p.chosen)
        prompt, answer = p.prompt, [m for m in p.chosen if m["role"] == "assistant"][:1]
    text = chat.render(tokenizer, prompt, generation_prompt=True)
    return EvalExample(text, tokenizer.encode(text, add_special_tokens=False), answer[0]["content"] if answer else "")


def _encoded(pieces: list[tuple[str, bool]], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Token ids of the pieces one after another, and labels: the ids of learnt pieces, IGNORE elsewhere."""
    ids, labels = [], []
    for text, learnt in pieces:
        tokens = tokenizer.encode(text, add_special_tokens=False)
        ids += tokens
        labels += tokens if learnt else [IGNORE] * len(tokens)
    return ids, labels


def _instruction(row: dict, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Prompt and response are tokenized apart, so the label boundary is exact."""
    prompt = encode_prompt(row, tokenizer, cfg)
    response = tokenizer.encode(cfg.response_template.format_map(row), add_special_tokens=False)
    if cfg.add_eos and tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    return prompt + response, ([IGNORE] * len(prompt) if not cfg.train_on_prompt else prompt) + response


def _answers(row: dict, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of the prompt followed by the chosen answer, and by the rejected one."""
    p = chat.pair(row)
    if p.conversational:
        return [_encoded(chat.pieces(tokenizer, p.prompt + answer, first=len(p.prompt)), tokenizer)
                for answer in (p.chosen, p.rejected)]
    out = []
    for answer in (p.chosen, p.rejected):
        ids, labels = _instruction({**row, "prompt": p.prompt, "response": answer}, tokenizer,
                                   replace(cfg, response_template="{response}", train_on_prompt=False))
        out.append((ids, labels))
    return out


def tokenize_row(row: dict, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> dict:
    limit = None if cfg.packing else cfg.max_length  # packing cuts rows itself, without losing tokens
    if cfg.format == "preference":
        (chosen, chosen_labels), (rejected, rejected_labels) = _answers(row, tokenizer, cfg)
        return {"chosen_input_ids": chosen[:limit], "chosen_labels": chosen_labels[:limit],
                "rejected_input_ids": rejected[:limit], "rejected_labels": rejected_labels[:limit]}
    if cfg.format == "messages":
        ids, labels = _encoded(chat.pieces(tokenizer, chat.conversation(row)), tokenizer)
    else:
        ids, labels = _instruction(row, tokenizer, cfg)
    return {"input_ids": ids[:limit], "labels": labels[:limit]}


def tokenize(ds: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> Dataset:
    out = ds.map(tokenize_row, fn_kwargs=dict(tokenizer=tokenizer, cfg=cfg), remove_columns=ds.column_names,
                 num_proc=cfg.num_proc, desc="tokenizing")
    return out.filter(_has_targets, num_proc=cfg.num_proc)


def _has_targets(row: dict) -> bool:
    """False for rows whose response was cut off entirely (for pairs: either answer): they teach nothing."""
    columns = ["chosen_labels", "rejected_labels"] if "chosen_labels" in row else ["labels"]
    return all(any(t != IGNORE for t in row[c][1:]) for c in columns)


def pack(ds: Dataset, length: int) -> Dataset:
    """Concatenate all rows and cut them into rows of exactly `length` tokens (the tail is dropped)."""
    ids = [t for row in ds["input_ids"] for t in row]
    labels = [t for row in ds["labels"] for t in row]
    n = len(ids) // length
    if n == 0:
        raise ValueError(f"The dataset holds {len(ids)} tokens, fewer than one packed row of {length}")
    return Dataset.from_dict({"input_ids": [ids[i * length:(i + 1) * length] for i in range(n)],
                              "labels": [labels[i * length:(i + 1) * length] for i in range(n)]})


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding: real tokens keep positions 0..n-1, as in the unpadded sequence. N preference pairs
    become 2N rows: the prompts with their chosen answers, then with their rejected answers."""
    if rows and "chosen_input_ids" in rows[0]:
        rows = [{"input_ids": r[f"{side}_input_ids"], "labels": r[f"{side}_labels"]}
                for side in ("chosen", "rejected") for r in rows]
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def use_chat_template(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                      raw: DatasetDict | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer, with the chat template of `cfg.chat_template` if given. Conversations need one (messages
    rows; preference rows of `raw` given as messages): without it, a UserError saying how to give one, which
    the entry points raise before any swarm starts."""
    if cfg.chat_template is not None:
        check_file(cfg.chat_template, "data.chat_template")
        with open(cfg.chat_template) as f:
            tokenizer.chat_template = f.read()
    if not getattr(tokenizer, "chat_template", None) and _conversations(cfg, raw):
        what = "the rows are conversations, and " if cfg.format == "preference" else ""
        raise UserError(f"data.format={cfg.format}: {what}the tokenizer of {tokenizer.name_or_path} has no chat "
                        "template: give one with data.chat_template=FILE (a jinja file)")
    return tokenizer


def _conversations(cfg: DataConfig, raw: DatasetDict | None) -> bool:
    """Whether the rows used need the chat template: messages always; preference pairs given as messages."""
    if cfg.format != "preference" or raw is None:
        return cfg.format == "messages"
    splits = [s for s in dict.fromkeys((cfg.split, cfg.val_split)) if s is not None and s in raw]
    return any(chat.pair(row).conversational for split in splits for row in raw[split])


class InstructionDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0,
                 raw: DatasetDict | None = None):
        """`seed` decides the held-out validation rows and the order of training rows; `raw`: the dataset,
        loaded already (by `load_checked`)."""
        super().__init__()
        self.cfg, self.tokenizer, self.seed = cfg, use_chat_template(tokenizer, cfg, raw), seed
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token to pad with")
        self.pad_id = pad
        self.train: Dataset | None = None
        self.val: Dataset | None = None
        self.raw: DatasetDict | None = raw
        self.rows: dict[str, Dataset] = {}    # untokenized "train" and "validation", as split for training

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        self._load()
        self.train, self.val = self._tokenized(self.rows["train"]), self._tokenized(self.rows["validation"])

    def _load(self) -> None:
        """The raw splits and the train/validation rows, without tokenizing anything (evaluation needs one split)."""
        if not self.rows:
            if self.raw is None:
                self.raw = load_raw(self.cfg)
            train, val = train_val_split(self.raw, self.cfg, self.seed)
            self.rows = {"train": train, "validation": val}

    def _tokenized(self, rows: Dataset) -> Dataset:
        ds = tokenize(rows, self.tokenizer, self.cfg)
        return pack(ds, self.cfg.max_length) if self.cfg.packing else ds

    def split_rows(self, split: str) -> Dataset:
        """Untokenized rows of `split`: "train" and "validation" as training splits them, else the dataset's own."""
        self._load()
        if split in self.rows:
            return self.rows[split]
        if split not in self.raw:
            raise KeyError(f"The dataset has no split {split!r}: use validation, train or one of {list(self.raw)}")
        return self.raw[split]

    def eval_examples(self, split: str = "validation", limit: int | None = None) -> list[EvalExample]:
        """The first `limit` prompts of `split` with their references, skipping prompts that leave no room
        for a response within max_length (training drops those rows too)."""
        examples = []
        for row in self.split_rows(split):
            if limit is not None and len(examples) >= limit:
                break
            example = eval_example(row, self.tokenizer, self.cfg)
            if len(example.input_ids) < self.cfg.max_length:
                examples.append(example)
        return examples

    def eval_dataloader(self, split: str = "validation") -> DataLoader:
        """Token batches of `split`, in order, for loss and perplexity."""
        ds = {"train": self.train, "validation": self.val}.get(split)  # tokenized already if training set them up
        if ds is None:
            ds = self._tokenized(self.split_rows(split))
        return self._loader(ds, self.cfg.eval_batch_size or self.cfg.batch_size, shuffle=False)

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.cfg.num_workers,
                          collate_fn=partial(collate, pad_id=self.pad_id),
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, self.cfg.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, self.cfg.eval_batch_size or self.cfg.batch_size, shuffle=False)
