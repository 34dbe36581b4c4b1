"""Tiny random-weight models: the script writes a sharded checkpoint with a loadable tokenizer, every
family's config builds, and the same seed gives the same weights.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from swarmtune.models import load_span
from swarmtune.tiny_model import VOCAB_SIZE, make_tiny_model, tiny_config, train_tokenizer
from tests.helpers import FAMILIES

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_model.py"


def test_script_writes_a_sharded_checkpoint_and_tokenizer(tmp_path):
    out = tmp_path / "tiny-qwen3"
    done = subprocess.run([sys.executable, str(SCRIPT), "--family", "qwen3", "--out", str(out), "--layers", "3",
                           "--hidden", "32", "--seed", "7"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == str(out)

    config = AutoConfig.from_pretrained(out)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("qwen3", 3, 32)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / shard).exists() for shard in shards)
    assert len({index["weight_map"][f"model.layers.{i}.mlp.down_proj.weight"] for i in range(3)}) > 1

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The swarm runs a model.")["input_ids"]
    assert 1 < len(ids) < 20 and max(ids) < config.vocab_size
    assert tokenizer.decode(ids) == "The swarm runs a model."
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "left"
    assert load_span(str(out), 1, 3).num_blocks == 2


def test_script_refuses_unsupported_families(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--family", "gpt2", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_info.value.code != 0
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_config_builds(family):
    config = tiny_config(family, layers=3, hidden=48)
    assert config.model_type == family
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (3, 48, VOCAB_SIZE)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = model.transformer.h if family == "bloom" else model.model.layers
    assert len(layers) == 3


def test_family_features_are_exercised():
    """The tiny configs keep what makes each family distinct, so the equivalence tests cover it."""
    assert tiny_config("llama").rope_parameters["rope_type"] == "llama3"
    assert tiny_config("llama").num_key_value_heads < tiny_config("llama").num_attention_heads
    assert tiny_config("mistral").sliding_window is not None
    assert tiny_config("qwen2").tie_word_embeddings
    assert tiny_config("mixtral").num_local_experts > tiny_config("mixtral").num_experts_per_tok > 1
    with pytest.raises(ValueError, match="llama"):
        tiny_config("gpt2")


def test_tokenizer_reserves_special_ids():
    tokenizer = train_tokenizer()
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<s>", "</s>"]


def test_same_seed_same_weights(tmp_path):
    def weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        path = make_tiny_model("llama", str(tmp_path / name), layers=2, hidden=32, seed=seed)
        return AutoModelForCausalLM.from_pretrained(path).state_dict()

    a, b, c = weights("a", 3), weights("b", 3), weights("c", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])
    assert os.path.exists(tmp_path / "a" / "tokenizer.json")
