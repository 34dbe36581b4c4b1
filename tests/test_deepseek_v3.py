"""DeepSeek-V3 (MLA, dense-then-MoE blocks) end to end: checkpoints as published, the latent KV cache and its
budget, and a 2-server swarm against the local transformers model (logits, gradients, generation, LoRA, a
server killed mid-generation). Spans, shards and PEFT export are also covered by the per-family tests.
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, DeepseekV3Config, LlamaConfig

from swarmtune import transport, wire
from swarmtune.client.config import ClientConfig
from swarmtune.client.inference import InferenceSession
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.client.span_requests import RequestRefused
from swarmtune.local_swarm import LocalSwarm
from swarmtune.models import get_family, load_config, load_span
from swarmtune.models.checkpoint import INDEX_FILE, open_checkpoint
from swarmtune.models.fp8 import FP8Error
from swarmtune.tuning.module import LoraSettings, OptimConfig, SwarmLM, TuningConfig
from tests.helpers import KillAfter, reference_model, span_logits, wait_until_seen
from tests.test_lora_grads import Reference, make_batch, max_diff, randomize
from tests.test_serving import _check_against_local

TOL = 1e-5
FP8_BLOCK = [16, 24]  # kv_a_proj_with_mqa is [24, 64]: scales [2, 3], both dimensions ending in a partial block
CACHE_MB = 1          # the KV budget of the server of blocks 0:3
PROMPT = "The swarm is a group of computers that"


@pytest.fixture(scope="module")
def path(tiny_models) -> str:
    return tiny_models("deepseek_v3")


@pytest.fixture(scope="module")
def reference(path):
    return reference_model(path)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def all_tensors(path: str) -> dict[str, torch.Tensor]:
    with open(os.path.join(path, INDEX_FILE)) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return {k: v for shard in shards for k, v in load_file(os.path.join(path, shard)).items()}


# --- checkpoints ------------------------------------------------------------------------------------------


def quantize_fp8(weight: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's format: float8_e4m3fn weights and one float32 scale per block (weight = fp8 * scale)."""
    rows, cols = weight.shape
    scale = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            r, c = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            scale[i, j] = weight[r, c].abs().max() / 448.0
            quantized[r, c] = (weight[r, c] / scale[i, j]).to(torch.float8_e4m3fn)
    return quantized, scale


def dequantized(quantized: torch.Tensor, scale: torch.Tensor, block: list[int]) -> torch.Tensor:
    out = quantized.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= scale[i, j]
    return out


def is_quantized_linear(key: str, tensor: torch.Tensor) -> bool:
    """What DeepSeek stores in FP8: the blocks' linear weights (not norms, not the router)."""
    return key.startswith("model.layers.") and tensor.dim() == 2 and not key.endswith(("norm.weight", "gate.weight"))


@pytest.fixture(scope="module")
def fp8_checkpoints(path, tmp_path_factory) -> tuple[str, str]:
    """(an FP8 checkpoint in two indexed shards, a float32 checkpoint of the weights it encodes)."""
    root = tmp_path_factory.mktemp("deepseek-fp8")
    fp8_dir, plain_dir = str(root / "fp8"), str(root / "dequantized")
    tensors = all_tensors(path)
    config = read_json(os.path.join(path, "config.json"))
    stored, plain = {}, {}
    for key, tensor in tensors.items():
        if is_quantized_linear(key, tensor):
            quantized, scale = quantize_fp8(tensor, FP8_BLOCK)
            stored[key], stored[key + "_scale_inv"] = quantized, scale
            plain[key] = dequantized(quantized, scale, FP8_BLOCK)
        else:
            stored[key] = plain[key] = tensor
    os.makedirs(fp8_dir)
    os.makedirs(plain_dir)
    keys = sorted(stored)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():  # a weight and its scales often land in different shards
        save_file({k: stored[k] for k in names}, os.path.join(fp8_dir, name), metadata={"format": "pt"})
    with open(os.path.join(fp8_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}, f)
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": FP8_BLOCK}
    with open(os.path.join(fp8_dir, "config.json"), "w") as f:
        json.dump({**config, "quantization_config": quant}, f)
    save_file(plain, os.path.join(plain_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(plain_dir, "config.json"), "w") as f:
        json.dump(config, f)
    return fp8_dir, plain_dir


@torch.no_grad()
def test_fp8_checkpoint_loads_to_the_dequantized_model(fp8_checkpoints, path):
    fp8_dir, plain_dir = fp8_checkpoints
    stored = all_tensors(fp8_dir)
    assert stored["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 3)
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]])
    expected = reference_model(plain_dir)(input_ids=ids).logits
    assert (expected - reference_model(path)(input_ids=ids).logits).abs().max() > 1e-4  # FP8 did round
    assert (span_logits(fp8_dir, ids, [(0, 2), (2, 6)]) - expected).abs().max().item() <= TOL


def test_fp8_scales_that_do_not_fit_the_block_size_are_refused(fp8_checkpoints, tmp_path):
    fp8_dir, _ = fp8_checkpoints
    config = read_json(os.path.join(fp8_dir, "config.json"))
    config["quantization_config"]["weight_block_size"] = [12, 24]  # rows / scale rows of kv_a: a wrong guess
    out = tmp_path / "bad"
    os.makedirs(out)
    for name in os.listdir(fp8_dir):
        os.symlink(os.path.join(fp8_dir, name), out / name)
    os.remove(out / "config.json")
    with open(out / "config.json", "w") as f:
        json.dump(config, f)
    open_checkpoint.cache_clear()
    with pytest.raises(FP8Error, match=r"scales of shape \[2, 3\] do not fit a \[\d+, 64\] weight in \[12, 24\]"):
        load_span(str(out), 1, 2)


@torch.no_grad()
def test_fused_expert_checkpoint_loads(path, reference, tmp_path):
    """Tensors saved as transformers 5.x modules hold them (fused experts) load as well as the published layout."""
    out = str(tmp_path / "fused")
    fused = {k: v.contiguous() for k, v in reference.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused
    reference.config.save_pretrained(out)
    save_file(fused, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    ids = torch.tensor([[8, 6, 7, 5, 3, 9]])
    assert (span_logits(out, ids, [(0, 1), (1, 6)]) - reference(input_ids=ids).logits).abs().max().item() <= TOL


@torch.no_grad()
def test_kimi_k2_config_loads_as_deepseek_v3(path, reference, tmp_path):
    """Kimi-K2 names its model_type kimi_k2 (for remote code, which we do not run): its blocks are DeepSeek-V3's."""
    out = tmp_path / "kimi"
    os.makedirs(out)
    for name in os.listdir(path):
        os.symlink(os.path.join(path, name), out / name)
    config = read_json(os.path.join(path, "config.json"))
    os.remove(out / "config.json")
    with open(out / "config.json", "w") as f:
        json.dump({**config, "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"],
                   "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}}, f)
    assert load_config(str(out)).model_type == "deepseek_v3"
    ids = torch.tensor([[8, 6, 7, 5, 3, 9]])
    assert (span_logits(str(out), ids, [(0, 6)]) - reference(input_ids=ids).logits).abs().max().item() <= TOL


def test_bf16_keeps_the_router_in_fp32(path):
    span = load_span(path, 0, 2, dtype="bf16")
    router = span.blocks[1].mlp.gate
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float32
    assert span.blocks[1].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.abs().sum() > 0  # the tiny model's routing bias is loaded, not zeros


# --- the latent KV cache ----------------------------------------------------------------------------------


def test_cache_holds_the_latent_and_sizes_follow_it(path, tiny_llama):
    span = load_span(path, 1, 4)
    config = span.config
    cache = span.make_cache(2, 7)
    assert cache.keys.shape == (3, 2, 1, 7, config.kv_lora_rank)      # what MLA passes to cache.update
    assert cache.values.shape == (3, 2, 1, 7, config.qk_rope_head_dim)
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    assert cache.nbytes == span.make_cache_nbytes(2, 7) == 3 * 2 * 7 * latent * 4
    llama = load_span(tiny_llama, 0, 2)
    kv = llama.config.num_key_value_heads * (llama.config.hidden_size // llama.config.num_attention_heads)
    assert llama.make_cache_nbytes(3, 5) == 2 * 3 * 5 * 2 * kv * 4  # GQA: keys and values of every KV head
    # the published shapes: 576 values per token for a DeepSeek-V3 layer, 2,048 for Llama-2-70B's
    assert get_family("deepseek_v3").cache_shape(DeepseekV3Config()).values_per_token == 576
    llama70b = LlamaConfig(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8)
    assert get_family("llama").cache_shape(llama70b).values_per_token == 2048


# --- through a swarm --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm(path):
    with LocalSwarm(path, spans=[(0, 3), (3, 6)], per_server=[{"cache_mb": CACHE_MB}, {}]) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def client(swarm, path):
    config = ClientConfig(initial_peers=swarm.initial_peers, step_timeout=5.0, ban_base=1.0)
    model = SwarmForCausalLM.from_pretrained(path, client_config=config)
    yield model
    model.close()


@pytest.fixture(scope="module")
def tokenizer(path):
    return AutoTokenizer.from_pretrained(path)


def test_logits_and_embedding_gradient_match_local(client, path):
    _check_against_local(client, path)


def test_greedy_generation_matches_local(client, reference, tokenizer):
    inputs = tokenizer([PROMPT], return_tensors="pt")
    expected = reference.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(client.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False), expected)


def test_lora_step_matches_local_peft(client, path):
    """Default targets (MLA, block 0's MLP, shared experts): gradients, then logits after an optimizer step."""
    module = SwarmLM(client, TuningConfig(lora=LoraSettings(rank=4, alpha=8)), OptimConfig())
    try:
        assert {k.split(".", 1)[1] for k in module.lora.keys_in(0, 1)} >= {"self_attn.q_a_proj", "mlp.up_proj"}
        assert "1.mlp.shared_experts.down_proj" in module.lora.keys
        randomize(module.lora.parameters(), seed=1)
        reference = Reference(path, module)
        batch = make_batch()
        out, ref = module(**batch), reference(**batch)
        out.loss.backward()
        ref.loss.backward()
        assert abs(out.loss.item() - ref.loss.item()) <= TOL
        for key in module.lora.keys:
            for ours, theirs in zip(module.lora.pair(key), reference.lora_pairs[key]):
                assert float(ours.grad.abs().max()) > 0, key
                assert max_diff(ours.grad, theirs.grad) <= TOL, key
        torch.optim.SGD(module.lora.parameters(), lr=0.5).step()
        reference.copy_lora(module)
        with torch.no_grad():
            assert max_diff(module(**batch).logits, reference(**batch).logits) <= TOL
    finally:
        client.lora = None


def _server_state(model: SwarmForCausalLM, peer_id: str) -> dict:
    conn = model.connection
    meta, _ = conn.run(transport.call(conn.p2p, peer_id, "info", wire.pack({}), 10), timeout=15)
    return meta


def test_mla_server_admits_its_budget_in_latent_tokens(client, swarm, path):
    """The 0:3 server's budget holds budget / (3 blocks x latent bytes) tokens: as many are admitted and
    reported, one more is refused (GQA-sized accounting would admit fewer than half as many)."""
    config = client.config
    latent_bytes = 3 * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
    tokens = (CACHE_MB << 20) // latent_bytes
    server = swarm.servers[0]
    deadline = time.monotonic() + 10  # sessions of earlier tests close asynchronously
    while _server_state(client, server.peer_id)["cache_bytes_free"] < CACHE_MB << 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    deadline = time.monotonic() + 20  # the server announces its free room every 15 s
    while True:
        client.connection.refresh()
        reported = client.connection.view.servers[server.peer_id].cache_tokens_left
        if reported == tokens or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert reported == tokens
    hidden = torch.randn(1, 2, config.hidden_size)
    with InferenceSession(client.connection, max_length=tokens, batch_size=1, start=0, end=3) as session:
        session.step(hidden)
    with pytest.raises(RequestRefused, match="cache budget"), \
            InferenceSession(client.connection, max_length=tokens + 1, batch_size=1, start=0, end=3) as session:
        session.step(hidden)


@pytest.mark.slow  # a third server starts and dies, as in test_moe_families (recovery itself: test_inference_sessions)
def test_server_killed_mid_generation_recovers_with_the_same_tokens(swarm, path, reference, tokenizer):
    victim = swarm.add_server((0, 6))  # one hop is preferred over two: sessions start on it
    config = ClientConfig(initial_peers=swarm.initial_peers, step_timeout=5.0, ban_base=1.0)
    model = SwarmForCausalLM.from_pretrained(path, client_config=config)
    try:
        wait_until_seen(model, victim.peer_id)
        inputs = tokenizer([PROMPT], return_tensors="pt")
        expected = reference.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        with model.inference_session(max_length=64) as session:
            out = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                 streamer=KillAfter(victim, 6))
            assert victim.proc.poll() is not None
            assert len(session.recoveries) == 1 and victim.peer_id not in [s.hop.peer_id for s in session.spans]
        assert torch.equal(out, expected)
    finally:
        model.close()
        victim.stop()
