"""Conversations and preference pairs: labels on exactly the assistant turns, as transformers' own assistant
masks mark them; ShareGPT rows; templates with and without a generation prompt; packing; pairs; bad rows."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from swarmtune.errors import UserError
from swarmtune.tuning import chat
from swarmtune.tuning.data import IGNORE, DataConfig, InstructionDataModule, load_checked, tokenize_row

CHAT = "pkg://swarmtune.assets/tiny_chat.jsonl"
PREFERENCE = "pkg://swarmtune.assets/tiny_preference.jsonl"

CONVERSATION = [
    {"role": "system", "content": "You answer in a few words."},
    {"role": "user", "content": "What is nine plus two?"},
    {"role": "assistant", "content": "eleven."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And a plum?"},
    {"role": "assistant", "content": "A plum is purple."},
]
SHAREGPT = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
            for m in CONVERSATION]

# ChatML-like, with a generation prompt; and one that has none (the assistant header is part of the turn)
WITH_PROMPT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
WITHOUT_PROMPT = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def learnt(tokenizer, row: dict, **config) -> tuple[list[int], list[int]]:
    out = tokenize_row(row, tokenizer, DataConfig(path="x", **{"format": "messages", "max_length": 512, **config}))
    return out["input_ids"], out["labels"]


def spans(labels: list[int]) -> list[list[int]]:
    """Runs of labelled tokens."""
    runs, run = [], []
    for t in [*labels, IGNORE]:
        if t != IGNORE:
            run.append(t)
        elif run:
            runs, run = [*runs, run], []
    return runs


@pytest.mark.parametrize("row", [{"messages": CONVERSATION}, {"conversations": SHAREGPT}], ids=["openai", "sharegpt"])
def test_labels_are_transformers_assistant_mask(tokenizer, row):
    """The tiny template marks assistant turns with {% generation %}: transformers' mask is the reference."""
    ids, labels = learnt(tokenizer, row)
    reference = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    assert ids == reference["input_ids"]
    assert [int(t != IGNORE) for t in labels] == reference["assistant_masks"]
    assert [t for t in labels if t != IGNORE] == [t for t, m in zip(ids, labels) if m != IGNORE]
    turns = [tokenizer.decode(s) for s in spans(labels)]
    assert turns == [f" {m['content']}</s>" for m in CONVERSATION if m["role"] == "assistant"]


@pytest.mark.parametrize("template,turn", [(WITH_PROMPT, "{}</s>"), (WITHOUT_PROMPT, "[assistant] {}</s>")],
                         ids=["with_generation_prompt", "without_generation_prompt"])
def test_labels_are_what_generation_must_write(tokenizer, tmp_path, template, turn):
    """Each assistant turn with its end-of-turn token, not the whitespace after it; with a generation prompt
    the header is the prompt's, without one the model must write it. The context before each turn is
    tokenized exactly as generation's prompt is."""
    path = tmp_path / "template.jinja"
    path.write_text(template)
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    dm = InstructionDataModule(DataConfig(path="x", format="messages", chat_template=str(path)), tok)
    ids, labels = learnt(dm.tokenizer, {"messages": CONVERSATION})
    assert [tok.decode(s) for s in spans(labels)] == \
        [turn.format(m["content"]) for m in CONVERSATION if m["role"] == "assistant"]
    for i, m in enumerate(CONVERSATION):
        if m["role"] == "assistant":
            prompt = tok.apply_chat_template(CONVERSATION[:i], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
            assert ids[:len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE != labels[len(prompt)]


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{{ messages | length }}{% endfor %}"
    with pytest.raises(chat.RowError, match="data.chat_template"):
        learnt(tok, {"messages": CONVERSATION})


def test_bundled_conversations_and_packing(tokenizer):
    """Every training row learns its assistant turns only; packed rows keep the same labels."""
    def module(**kwargs):
        dm = InstructionDataModule(DataConfig(path=CHAT, format="messages", **kwargs), tokenizer)
        dm.setup("fit")
        return dm

    plain, packed = module(max_length=512), module(packing=True, max_length=128)
    for row in plain.train:
        text = tokenizer.decode([t for t in row["labels"] if t != IGNORE])
        assert text.endswith("</s>") and "User:" not in text and "Assistant:" not in text
    labelled = sum(t != IGNORE for r in plain.train["labels"] for t in r)
    assert all(len(r) == 128 for r in packed.train["input_ids"])
    assert sum(t != IGNORE for r in packed.train["labels"] for t in r) <= labelled
    assert len(packed.train) == sum(len(r) for r in plain.train["input_ids"]) // 128
    example = plain.eval_examples(limit=1)[0]
    assert example.prompt.endswith("Assistant:") and example.input_ids == tokenizer.encode(
        example.prompt, add_special_tokens=False)


@pytest.mark.parametrize("row", [
    {"prompt": "What colour is the sky?", "chosen": "The sky is blue.", "rejected": "No idea."},
    {"prompt": "What colour is the sky?",  # as ultrafeedback_binarized: answers start with the prompt
     "chosen": [{"role": "user", "content": "What colour is the sky?"},
                {"role": "assistant", "content": "The sky is blue."}],
     "rejected": [{"role": "user", "content": "What colour is the sky?"},
                  {"role": "assistant", "content": "No idea."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the sky?"}],
     "chosen": "The sky is blue.", "rejected": [{"role": "assistant", "content": "No idea."}]},
    {"prompt": [{"from": "human", "value": "What colour is the sky?"}],
     "chosen": [{"from": "gpt", "value": "The sky is blue."}], "rejected": "No idea."},
], ids=["strings", "ultrafeedback", "messages", "sharegpt"])
def test_pairs_share_the_prompt_and_learn_the_answers(tokenizer, row):
    out = tokenize_row(row, tokenizer, DataConfig(path="x", format="preference"))
    answers = {}
    for side in ("chosen", "rejected"):
        ids, labels = out[f"{side}_input_ids"], out[f"{side}_labels"]
        start = labels.index(next(t for t in labels if t != IGNORE))
        assert all(t != IGNORE for t in labels[start:])
        answers[side] = (ids[:start], tokenizer.decode(ids[start:]))
    assert answers["chosen"][0] == answers["rejected"][0]  # the same prompt tokens
    assert answers["chosen"][1].strip() == "The sky is blue.</s>"
    assert answers["rejected"][1].strip() == "No idea.</s>"


def test_a_batch_of_pairs_is_chosen_then_rejected(tokenizer):
    dm = InstructionDataModule(DataConfig(path=PREFERENCE, format="preference", batch_size=4), tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8
    rows = [tokenizer.decode(ids[mask == 1]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    for chosen, rejected in zip(rows[:4], rows[4:]):
        prompt = chosen[:chosen.index("Assistant:")]
        assert rejected.startswith(prompt + "Assistant:") and chosen != rejected
    example = dm.eval_examples(limit=1)[0]
    assert example.prompt.endswith("Assistant:") and example.reference and not example.reference.endswith("</s>")


@pytest.mark.parametrize("fmt,row,words", [
    ("messages", {"messages": [{"content": "hi"}]}, "row 1 of split 'train': messages[0] has no 'role'"),
    ("messages", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role is 'robot'"),
    ("messages", {"conversations": [{"from": "human"}]}, "conversations[0] has no 'value' text"),
    ("messages", {"text": "hi"}, "row 1 of split 'train': no 'messages'"),
    ("preference", {"prompt": "hi", "chosen": "a"}, "row 1 of split 'train': no 'rejected'"),
    ("preference", {"chosen": "a", "rejected": "b"}, "no 'prompt'"),
    ("preference", {"prompt": "q", "chosen": [{"role": "user", "content": "q"}], "rejected": "b"},
     "'chosen' has no assistant message"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_a_malformed_row_is_named_with_its_field(tmp_path, fmt, row, words):
    good = {"messages": CONVERSATION} if fmt == "messages" else {"prompt": "q", "chosen": "a", "rejected": "b"}
    if isinstance(row.get("chosen"), list):  # a column holds strings or lists, not both
        good["chosen"] = [{"role": "assistant", "content": "a"}]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError) as caught:
        load_checked(DataConfig(path=str(path), format=fmt))
    message = str(caught.value)
    assert words in message and "\n" not in message and f"data.format={fmt}" in message
