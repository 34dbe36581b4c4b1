"""The instruction data module: templates, response-only labels, padding, packing, splits, file formats."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from swarmtune.tuning.data import IGNORE, DataConfig, InstructionDataModule, collate, resolve_path

BUNDLED = "pkg://swarmtune.assets/tiny_instruct.jsonl"
TEMPLATE = dict(prompt_template="Q: {prompt}\nA: ", response_template="{response}")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def setup(tokenizer, seed: int = 0, **kwargs) -> InstructionDataModule:
    dm = InstructionDataModule(DataConfig(**{"path": BUNDLED, **TEMPLATE, **kwargs}), tokenizer, seed=seed)
    dm.setup("fit")
    return dm


def bundled_rows() -> list[dict]:
    with open(resolve_path(BUNDLED)) as f:
        return [json.loads(line) for line in f]


def test_bundled_dataset_ships_with_the_package():
    rows = bundled_rows()
    assert len(rows) >= 150 and all(set(r) == {"prompt", "response"} for r in rows)


def test_labels_cover_only_the_response(tokenizer):
    dm = setup(tokenizer, val_fraction=0.1, seed=3)
    assert len(dm.train) + len(dm.val) == len(bundled_rows()) and len(dm.val) == pytest.approx(20, abs=1)
    by_prompt = {r["prompt"]: r["response"] for r in bundled_rows()}
    for row in dm.train.select(range(20)):
        ids, labels = row["input_ids"], row["labels"]
        n_prompt = sum(1 for t in labels if t == IGNORE)
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert labels[n_prompt:] == ids[n_prompt:]
        prompt = tokenizer.decode(ids[1:n_prompt])
        assert prompt.startswith("Q: ") and prompt.endswith("\nA: ")
        assert tokenizer.decode(ids[n_prompt:-1]) == by_prompt[prompt[3:-4]]


def test_train_on_prompt_and_truncation(tokenizer):
    dm = setup(tokenizer, train_on_prompt=True, max_length=12)
    for row in dm.train.select(range(20)):
        assert row["labels"] == row["input_ids"] and len(row["input_ids"]) <= 12


def test_right_padding(tokenizer):
    dm = setup(tokenizer, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE).all()
    assert int(lengths.max()) == batch["input_ids"].shape[1]


def test_packing(tokenizer):
    dm = setup(tokenizer, packing=True, max_length=32, val_fraction=0.2)
    unpacked = setup(tokenizer, val_fraction=0.2)
    assert all(len(r) == 32 for r in dm.train["input_ids"])
    total = sum(len(r) for r in unpacked.train["input_ids"])
    assert len(dm.train) == total // 32
    batch = next(iter(dm.train_dataloader()))
    assert batch["attention_mask"].all()


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_local_file_formats(tokenizer, tmp_path, fmt):
    import pandas as pd

    frame = pd.DataFrame(bundled_rows())
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=fmt == "jsonl")
    dm = setup(tokenizer, path=str(path), cache_dir=str(tmp_path / "cache"))
    reference = setup(tokenizer)
    assert dm.train["input_ids"] == reference.train["input_ids"]


def test_dataset_directory_with_splits(tokenizer, tmp_path):
    """A directory is loaded by name, as a hub dataset would be; its validation split is used as is."""
    rows = bundled_rows()
    for split, part in (("train", rows[:150]), ("validation", rows[150:])):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    dm = setup(tokenizer, path=str(tmp_path), val_split="validation", max_val_samples=10,
               cache_dir=str(tmp_path / "cache"))
    assert len(dm.train) == 150 and len(dm.val) == 10


def test_collate_without_padding_needed():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}] * 2
    batch = collate(rows, pad_id=0)
    assert batch["attention_mask"].all() and torch.equal(batch["labels"][0], torch.tensor([IGNORE, 6, 7]))
