"""Trained adapters in distributed generation: client-owned, written by plain PEFT, hosted by servers, mixed."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarmtune.client.config import ClientConfig
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.local_swarm import LocalSwarm
from tests.helpers import adapter_path, reference_model

PROMPTS = ["Question: what do bees make? Answer:", "Once upon a time"]
GENERATE = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def trained_adapter(tiny_local_run) -> str:
    return adapter_path(tiny_local_run[1])


@pytest.fixture(scope="module")
def peft_adapter(tiny_llama, tmp_path_factory) -> str:
    """An adapter written by plain PEFT on the tiny base, with non-zero B so that it matters."""
    torch.manual_seed(3)
    model = get_peft_model(reference_model(tiny_llama), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                                                      "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    out = str(tmp_path_factory.mktemp("peft-adapter"))
    model.save_pretrained(out)
    return out


def _peft_tokens(tiny_llama: str, adapter: str | None, inputs) -> torch.Tensor:
    model = reference_model(tiny_llama)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.generate(**inputs, **GENERATE)


def _client(swarm, tiny_llama, **kwargs) -> SwarmForCausalLM:
    return SwarmForCausalLM.from_pretrained(tiny_llama, client_config=ClientConfig(initial_peers=swarm.initial_peers),
                                            **kwargs)


@pytest.mark.parametrize("which", ["trained", "peft"])
def test_adapter_generates_like_peft(which, request, llama_swarm, tiny_llama, tokenizer):
    adapter = request.getfixturevalue(f"{which}_adapter")
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    expected = _peft_tokens(tiny_llama, adapter, inputs)
    assert not torch.equal(expected, _peft_tokens(tiny_llama, None, inputs))  # the adapter changes the output
    model = _client(llama_swarm, tiny_llama, adapter=adapter)
    try:
        assert torch.equal(model.generate(**inputs, **GENERATE), expected)
    finally:
        model.close()


@pytest.fixture(scope="module")
def hosting_swarm(tiny_llama, peft_adapter):
    with LocalSwarm(tiny_llama, spans=[(0, 3), (3, 6)], adapters=[f"qv={peft_adapter}"]) as swarm:
        yield swarm


def test_hosted_adapter_sends_no_weights(hosting_swarm, tiny_llama, tokenizer, peft_adapter):
    inputs = tokenizer(PROMPTS[:1], return_tensors="pt")
    expected = _peft_tokens(tiny_llama, peft_adapter, inputs)
    model = _client(hosting_swarm, tiny_llama, active_adapter="qv")
    try:
        assert all("qv" in s.adapters for s in model.connection.view.servers.values())
        with model.inference_session(max_length=64) as session:
            assert torch.equal(model.generate(**inputs, **GENERATE), expected)
        assert session.bytes_sent < 20_000  # steps only: 12 tokens of 64 floats, and no adapter tensors
        model(input_ids=inputs["input_ids"])  # forward passes name the adapter too
        assert model.remote.replayer.stats.lora_bytes_sent == 0
    finally:
        model.close()


def test_hosted_adapter_with_a_draft(hosting_swarm, tiny_llama, tokenizer, peft_adapter):
    """Speculative decoding with a draft of the base model: the adapter's tokens, drafts kept or not."""
    inputs = tokenizer(PROMPTS[:1], return_tensors="pt")
    expected = _peft_tokens(tiny_llama, peft_adapter, inputs)
    draft = AutoModelForCausalLM.from_pretrained(tiny_llama, num_hidden_layers=2).eval()
    model = _client(hosting_swarm, tiny_llama, active_adapter="qv")
    try:
        assert torch.equal(model.generate(**inputs, **GENERATE, assistant_model=draft), expected)
        assert model.draft_length.drafted_total > 0
    finally:
        model.close()


def test_adapters_side_by_side(hosting_swarm, tiny_llama, tokenizer, peft_adapter, trained_adapter):
    """Three clients interleave generations on the same servers: client-owned, hosted and no adapter."""
    inputs = tokenizer(PROMPTS[:1], return_tensors="pt")
    setups = {"client-owned": dict(adapter=trained_adapter), "hosted": dict(active_adapter="qv"), "none": {}}
    expected = {"client-owned": _peft_tokens(tiny_llama, trained_adapter, inputs),
                "hosted": _peft_tokens(tiny_llama, peft_adapter, inputs),
                "none": _peft_tokens(tiny_llama, None, inputs)}
    models = {name: _client(hosting_swarm, tiny_llama, **kwargs) for name, kwargs in setups.items()}
    results, errors = {}, []

    def generate(name: str) -> None:
        try:
            for _ in range(3):
                results.setdefault(name, []).append(models[name].generate(**inputs, **GENERATE))
        except Exception as e:  # reported below, in the test's thread
            errors.append((name, e))

    threads = [threading.Thread(target=generate, args=(name,)) for name in models]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        for name, outs in results.items():
            assert all(torch.equal(out, expected[name]) for out in outs), name
    finally:
        for model in models.values():
            model.close()
