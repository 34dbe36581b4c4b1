"""Adapter files: what we write, plain PEFT loads (and the reverse), for llama- and bloom-style keys."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from swarmtune.adapters import peft_format
from swarmtune.adapters.lora import ClientLora, target_shapes
from swarmtune.adapters.prompts import SoftPrompts
from swarmtune.atomic import write_atomic
from swarmtune.models import load_config
from tests.helpers import reference_model


def random_lora(config, targets=None, blocks=None, rank=4, alpha=8.0, seed=0) -> ClientLora:
    torch.manual_seed(seed)
    lora = ClientLora(target_shapes(config, targets, blocks), rank=rank, alpha=alpha)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.1)  # nonzero B: the adapter changes outputs
    return lora


def peft_weights(peft_model, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The A and B matrices PEFT attached to block module `key` ("3.self_attn.q_proj")."""
    block, path = key.split(".", 1)
    base = peft_model.base_model.model
    layers = base.model.layers if hasattr(base, "model") else base.transformer.h
    module = layers[int(block)].get_submodule(path)
    return module.lora_A["default"].weight, module.lora_B["default"].weight


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # bloom: our head is untied anyway
@pytest.mark.parametrize("family,targets,blocks", [
    ("llama", None, None),
    ("llama", ["q_proj", "v_proj"], [1, 4]),
    ("bloom", ["query_key_value", "dense_4h_to_h"], None),
    ("glm4_moe", None, None),  # a dense MLP in block 0, shared experts in the others: named module by module
    ("gpt_oss", None, [0, 3]),
    ("deepseek_v3", None, None),  # MLA everywhere, dense MLP in block 0, shared experts in the others
    ("deepseek_v3", ["kv_a_proj_with_mqa", "down_proj"], [0, 3]),
])
def test_peft_loads_exported_lora(tiny_models, tmp_path, family, targets, blocks):
    path = tiny_models(family)
    config = load_config(path)
    lora = random_lora(config, targets, blocks)
    head = torch.randn(config.vocab_size, config.hidden_size)
    peft_format.save_adapter(str(tmp_path), config, path, lora=lora, lm_head=head)

    state = load_file(tmp_path / peft_format.ADAPTER_WEIGHTS)
    prefix = "base_model.model.transformer.h." if family == "bloom" else "base_model.model.model.layers."
    assert all(k.startswith(prefix) or k == peft_format.LM_HEAD_KEY for k in state)

    peft_model = PeftModel.from_pretrained(reference_model(path), str(tmp_path))
    loaded = {n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert len(loaded) == len(lora.keys)  # nothing more, nothing less
    for key in lora.keys:
        for ours, theirs in zip(lora.pair(key), peft_weights(peft_model, key)):
            torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    assert peft_model.peft_config["default"].lora_alpha / peft_model.peft_config["default"].r == lora.scale
    torch.testing.assert_close(peft_model.base_model.model.lm_head.modules_to_save["default"].weight, head)


@pytest.mark.parametrize("family", ["llama", "bloom", "glm4_moe", "deepseek_v3"])
def test_import_adapter_written_by_peft(tiny_models, tmp_path, family):
    path = tiny_models(family)
    # glm4_moe: the shared experts of blocks 1-5 (a bare "gate_proj" would make PEFT adapt the routed experts'
    # fused tensors too, which we refuse)
    targets = {"llama": ["q_proj", "v_proj"], "bloom": ["query_key_value"],
               "glm4_moe": ["q_proj", "shared_experts.gate_proj"],
               "deepseek_v3": ["q_b_proj", "shared_experts.down_proj"]}[family]
    torch.manual_seed(1)
    peft_model = get_peft_model(reference_model(path), LoraConfig(r=4, lora_alpha=12, target_modules=targets,
                                                                  use_rslora=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(str(tmp_path))

    lora = peft_format.load_lora(str(tmp_path), load_config(path))
    assert lora.rank == 4 and lora.scale == pytest.approx(12 / 2) and lora.use_rslora
    assert len(lora.keys) == sum(n.endswith(".lora_A") for n, _ in peft_model.named_modules())
    # block 0 of glm4_moe and deepseek_v3 is dense: it has no shared experts
    assert len(lora.keys) == (11 if family in ("glm4_moe", "deepseek_v3") else 6 * len(targets))
    for key in lora.keys:
        for ours, theirs in zip(lora.pair(key), peft_weights(peft_model, key)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_roundtrip_with_prompts(tiny_llama, tmp_path):
    config = load_config(tiny_llama)
    lora = random_lora(config, ["o_proj"], [0, 2, 5])
    prompts = SoftPrompts(5, config.hidden_size, config.num_hidden_layers, shallow=True, deep=True)
    with torch.no_grad():
        prompts.deep.normal_()
    peft_format.save_adapter(str(tmp_path), config, tiny_llama, lora=lora, soft_prompts=prompts)

    adapter = peft_format.load_adapter(str(tmp_path), config)
    assert adapter.lora.keys == lora.keys and adapter.lm_head is None
    for key in lora.keys:
        for ours, theirs in zip(lora.pair(key), adapter.lora.pair(key)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(adapter.soft_prompts.prompt, prompts.prompt, rtol=0, atol=0)
    torch.testing.assert_close(adapter.soft_prompts.deep, prompts.deep, rtol=0, atol=0)
    written = json.loads((tmp_path / peft_format.ADAPTER_CONFIG).read_text())
    assert written["layers_to_transform"] == [0, 2, 5] and written["layers_pattern"] == "layers"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_rejects_adapter_of_another_model(tiny_models, tiny_llama, tmp_path):
    small = tiny_models("llama", layers=6, hidden=32)
    peft_format.save_adapter(str(tmp_path), load_config(small), small, lora=random_lora(load_config(small)))
    with pytest.raises(ValueError, match="do not match"):
        peft_format.load_lora(str(tmp_path), load_config(tiny_llama))


def test_interrupted_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "adapter_config.json"
    target.write_text("old")

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        write_atomic(str(target), b"new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["adapter_config.json"]


def test_interrupted_checkpoint_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from swarmtune.tuning.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 10, "state_dict": {"w": torch.ones(3)}}, path)

    def crash(fd):
        raise OSError("killed mid-write")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"global_step": 20, "state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 10
    assert os.listdir(tmp_path) == ["last.ckpt"]
