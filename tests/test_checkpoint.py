"""Per-block checkpoint loading: only the needed shards are opened or fetched, bad files fail clearly,
base-model and unindexed checkpoints load, and a 1-block span does not materialise the other blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from swarmtune.models import CheckpointError, get_family, load_client_parts, load_config, load_span, parse_dtype
from swarmtune.models import checkpoint as checkpoint_module
from swarmtune.models.checkpoint import INDEX_FILE, open_checkpoint
from tests.helpers import FAMILIES, reference_model, span_logits

TOL = 1e-5
HUB_ID = "swarmtune-tests/tiny-model"


def weight_map(path: str) -> dict[str, str]:
    with open(os.path.join(path, INDEX_FILE)) as f:
        return json.load(f)["weight_map"]


def shards_with_prefix(path: str, *prefixes: str) -> set[str]:
    return {file for key, file in weight_map(path).items() if key.startswith(prefixes)}


def client_shards(path: str, model_type: str) -> set[str]:
    family = get_family(model_type)
    prefixes = (family.embed_key, family.final_norm_prefix, family.lm_head_key, family.embed_norm_prefix or "\0")
    return shards_with_prefix(path, *prefixes)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Names of the files that checkpoint loading opens with safetensors, in order."""
    names: list[str] = []

    def recording_safe_open(path, *args, **kwargs):
        names.append(os.path.basename(path))
        return safe_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "safe_open", recording_safe_open)
    return names


@pytest.fixture
def fresh_checkpoints():
    """Forget cached tensor maps, so hub fakes and edited copies are read anew (and not seen by later tests)."""
    open_checkpoint.cache_clear()
    yield
    open_checkpoint.cache_clear()


def copy_model(path: str, tmp_path) -> str:
    out = str(tmp_path / "copy")
    shutil.copytree(path, out)
    return out


# --- only the needed shards ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_span_opens_only_its_shards(tiny_models, opened, family):
    path = tiny_models(family)
    block_prefix = get_family(family).block_prefix
    for start, end in [(0, 1), (2, 4), (5, 6)]:
        opened.clear()
        load_span(path, start, end)
        expected = shards_with_prefix(path, *(block_prefix.format(i) for i in range(start, end)))
        assert set(opened) == expected
        assert len(expected) < len(set(weight_map(path).values())), "the test needs blocks in separate shards"


@pytest.mark.parametrize("family", FAMILIES)
def test_client_parts_open_only_embedding_norm_and_head_shards(tiny_models, opened, family):
    path = tiny_models(family)
    load_client_parts(path)
    assert set(opened) == client_shards(path, family)


def test_tied_embeddings_share_the_weight(tiny_models):
    path = tiny_models("qwen2")
    assert load_config(path).tie_word_embeddings
    assert "lm_head.weight" not in weight_map(path)
    parts = load_client_parts(path)
    assert parts.lm_head.weight is parts.embed_tokens.weight
    untied = load_client_parts(tiny_models("llama"))
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()


# --- missing and corrupt files ----------------------------------------------------------------------------


def test_missing_shard_names_the_file_and_spares_other_blocks(tiny_llama, tmp_path):
    path = copy_model(tiny_llama, tmp_path)
    (missing,) = shards_with_prefix(path, "model.layers.3.self_attn.q_proj")
    os.remove(os.path.join(path, missing))
    with pytest.raises(CheckpointError, match=f"missing.*{missing}"):
        load_span(path, 3, 4)
    survivor = next(i for i in range(6) if missing not in shards_with_prefix(path, f"model.layers.{i}."))
    assert load_span(path, survivor, survivor + 1).num_blocks == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_shard_names_the_file(tiny_llama, tmp_path, damage):
    path = copy_model(tiny_llama, tmp_path)
    (bad,) = shards_with_prefix(path, "model.layers.2.self_attn.q_proj")
    file = os.path.join(path, bad)
    data = Path(file).read_bytes()
    replacement = {"truncated": data[: len(data) - 100], "garbage": os.urandom(len(data)), "empty": b""}[damage]
    with open(file, "wb") as f:
        f.write(replacement)
    with pytest.raises(CheckpointError, match=bad):
        load_span(path, 2, 3)


def test_shard_lacking_an_indexed_tensor_names_the_file(tiny_llama, tmp_path):
    path = copy_model(tiny_llama, tmp_path)
    key = "model.layers.1.self_attn.q_proj.weight"
    shard = os.path.join(path, weight_map(path)[key])
    tensors = {k: v.clone() for k, v in load_file(shard).items() if k != key}  # copies: the file is rewritten
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=os.path.basename(shard)):
        load_span(path, 1, 2)


def test_corrupt_index_names_the_file(tiny_llama, tmp_path, fresh_checkpoints):
    path = copy_model(tiny_llama, tmp_path)
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match=INDEX_FILE):
        load_span(path, 0, 1)


def test_config_and_tensors_that_disagree_fail_clearly(tiny_llama):
    config = load_config(tiny_llama)
    config.intermediate_size *= 2
    with pytest.raises(CheckpointError, match="block 0"):
        load_span(tiny_llama, 0, 1, config=config)


def test_unknown_dtype_is_refused():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        parse_dtype("int3")


# --- other checkpoint layouts -----------------------------------------------------------------------------


def read_all(path: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(set(weight_map(path).values())):
        tensors.update(load_file(os.path.join(path, shard)))
    return tensors


def save_base_model_checkpoint(path: str, out: str, prefix: str) -> None:
    """A single-file checkpoint saved from the base model, as bigscience/bloom ships: keys without `prefix`."""
    os.makedirs(out)
    tensors = {k.removeprefix(prefix): v for k, v in read_all(path).items() if k.startswith(prefix)}
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(path, "config.json"), out)


@torch.no_grad()
def test_base_model_checkpoint_without_prefix_loads(tiny_models, tmp_path):
    path = tiny_models("bloom")
    out = str(tmp_path / "bloom-base")
    save_base_model_checkpoint(path, out, "transformer.")
    assert not any(k.startswith("transformer.") for k in open_checkpoint(out).weight_map)
    ids = torch.tensor([[5, 17, 42, 99, 7, 250]])
    expected = reference_model(path)(input_ids=ids).logits
    assert (span_logits(out, ids, [(0, 4), (4, 6)]) - expected).abs().max().item() <= TOL


def test_base_model_checkpoint_without_head_or_tying_fails_clearly(tiny_llama, tmp_path):
    out = str(tmp_path / "llama-base")
    save_base_model_checkpoint(tiny_llama, out, "model.")
    assert load_span(out, 0, 1).num_blocks == 1
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_client_parts(out)


@torch.no_grad()
def test_sharded_checkpoint_without_index_loads(tiny_llama, tmp_path):
    path = copy_model(tiny_llama, tmp_path)
    os.remove(os.path.join(path, INDEX_FILE))
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    expected = reference_model(tiny_llama)(input_ids=ids).logits
    assert (span_logits(path, ids, [(0, 3), (3, 6)]) - expected).abs().max().item() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "glm4_moe"])
def test_fused_expert_checkpoint_loads(tiny_models, tmp_path, family):
    """MoE tensors stored in transformers' fused expert layout load as well as the per-expert one (which
    `save_pretrained` writes, as the published checkpoints have it)."""
    path = tiny_models(family)
    assert any(".experts.0." in k for k in weight_map(path))
    out = str(tmp_path / f"{family}-fused")
    reference = reference_model(path)
    fused = {k: v.contiguous() for k, v in reference.state_dict().items()}  # save_pretrained would unfuse them
    reference.config.save_pretrained(out)
    save_file(fused, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused)
    ids = torch.tensor([[8, 6, 7, 5, 3, 9]])
    expected = reference(input_ids=ids).logits
    assert (span_logits(out, ids, [(0, 1), (1, 6)]) - expected).abs().max().item() <= TOL


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings from /proc")
@pytest.mark.parametrize("family, mapped", [("llama", True), ("qwen3_moe", False)])
def test_a_block_with_converted_tensors_keeps_no_shard_mapped(tiny_models, tmp_path, family, mapped):
    """Tensors kept as read are views of their shard's mapping (the weights themselves, not a copy); a block
    whose experts were fused holds no view, else the mapping would keep the experts' source pages in the
    server's RSS beside the fused copy."""
    path = copy_model(tiny_models(family), tmp_path)  # a copy that nothing else in this process maps
    span = load_span(path, 0, 1)
    with open("/proc/self/maps") as f:
        maps = f.read()
    del span  # alive until the mappings were read
    assert (os.path.realpath(path) in maps) == mapped


def write_mxfp4_checkpoint(path: str, out: str, scales: tuple[int, int] = (117, 124)) -> None:
    """gpt-oss as openai publishes it: random MXFP4 experts (`*_blocks` codes, `*_scales` exponents drawn
    from `scales`), other tensors as they are, in two shards with an index."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, tensor in read_all(path).items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, rows_in, rows_out = tensor.shape  # stored transposed: output rows of 32-value groups
            state[key + "_blocks"] = torch.randint(0, 256, (experts, rows_out, rows_in // 32, 16), dtype=torch.uint8,
                                                   generator=g)
            state[key + "_scales"] = torch.randint(*scales, (experts, rows_out, rows_in // 32), dtype=torch.uint8,
                                                   generator=g)
        else:
            state[key] = tensor
    os.makedirs(out)
    shards: dict[str, dict[str, torch.Tensor]] = {"model-00001-of-00002.safetensors": {},
                                                   "model-00002-of-00002.safetensors": {}}
    for key, tensor in state.items():
        second = key.startswith(tuple(f"model.layers.{i}." for i in range(3, 6))) or key.startswith("lm_head")
        shards[sorted(shards)[second]][key] = tensor
    for name, tensors in shards.items():
        save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, tensors in shards.items() for k in tensors}}
    with open(os.path.join(out, INDEX_FILE), "w") as f:
        json.dump(index, f)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)


@torch.no_grad()
def test_gpt_oss_mxfp4_experts_load_dequantized(tiny_models, tmp_path):
    """A sharded MXFP4 gpt-oss checkpoint serves what transformers' own dequantization of it computes."""
    from transformers import Mxfp4Config

    out = str(tmp_path / "gpt-oss-mxfp4")
    write_mxfp4_checkpoint(tiny_models("gpt_oss"), out)
    assert any(k.endswith("gate_up_proj_scales") for k in weight_map(out))
    reference = AutoModelForCausalLM.from_pretrained(out, quantization_config=Mxfp4Config(dequantize=True),
                                                     dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([[8, 6, 7, 5, 3, 9, 11, 4]])
    expected = reference(input_ids=ids).logits
    assert (span_logits(out, ids, [(0, 2), (2, 6)]) - expected).abs().max().item() <= TOL
    # a loader ignoring the scales would read every group at scale 2**0, as this file has it: far from it
    flat = str(tmp_path / "gpt-oss-mxfp4-unscaled")
    write_mxfp4_checkpoint(tiny_models("gpt_oss"), flat, scales=(127, 128))
    assert (span_logits(flat, ids, [(0, 6)]) - expected).abs().max().item() > 1e-2


# --- hub model ids ----------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch, tiny_llama, fresh_checkpoints) -> list[str]:
    """Serve HUB_ID from the local tiny llama through huggingface_hub's API; returns the requested file names."""
    requested: list[str] = []

    def hf_hub_download(repo_id, filename, *, revision=None, **kwargs):
        assert repo_id == HUB_ID
        requested.append(filename)
        path = os.path.join(tiny_llama, filename)
        if not os.path.exists(path):
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        return path

    def list_repo_files(repo_id, *, revision=None, **kwargs):
        assert repo_id == HUB_ID
        return sorted(os.listdir(tiny_llama))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    return requested


def test_hub_config_fetches_only_config_json(fake_hub, tiny_llama):
    config = load_config(HUB_ID)
    assert fake_hub == ["config.json"]
    assert config.name_or_path == HUB_ID
    local = load_config(tiny_llama)
    local._name_or_path = HUB_ID
    assert config.to_dict() == local.to_dict()


def test_hub_span_and_client_parts_fetch_only_their_shards(fake_hub, tiny_llama):
    span = load_span(HUB_ID, 2, 4)
    expected = shards_with_prefix(tiny_llama, "model.layers.2.", "model.layers.3.")
    assert set(fake_hub) == {"config.json", INDEX_FILE} | expected
    local = load_span(tiny_llama, 2, 4).state_dict()
    assert all(torch.equal(v, local[k]) for k, v in span.state_dict().items())

    fake_hub.clear()
    load_client_parts(HUB_ID)
    assert set(fake_hub) == {"config.json"} | client_shards(tiny_llama, "llama")


def test_hub_offline_uses_the_cached_index(fake_hub, monkeypatch, tiny_llama):
    def offline(*args, **kwargs):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    def try_to_load_from_cache(repo_id, filename, **kwargs):
        return os.path.join(tiny_llama, filename) if filename == INDEX_FILE else None

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", try_to_load_from_cache)
    assert load_span(HUB_ID, 5, 6).num_blocks == 1
    assert set(fake_hub) == {"config.json", INDEX_FILE} | shards_with_prefix(tiny_llama, "model.layers.5.")


def test_hub_fetch_failure_names_the_file(fake_hub, tiny_llama, tmp_path, monkeypatch):
    (lost,) = shards_with_prefix(tiny_llama, "model.layers.4.self_attn.q_proj")
    serve = huggingface_hub.hf_hub_download

    def flaky(repo_id, filename, **kwargs):
        if filename == lost:
            raise ConnectionError("connection reset")
        return serve(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", flaky)
    with pytest.raises(CheckpointError, match=f"{lost}.*{HUB_ID}.*connection reset"):
        load_span(HUB_ID, 4, 5)


# --- memory -----------------------------------------------------------------------------------------------

MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    from swarmtune.models import load_config, load_span

    def peak_rss() -> int:
        # VmHWM is this process's own peak; ru_maxrss would start at the forking pytest's size.
        line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    config = load_config(sys.argv[1])
    before = peak_rss()
    span = load_span(sys.argv[1], int(sys.argv[2]), int(sys.argv[2]) + 1, config=config)
    # CPU weights may stay mapped from the shard until first read: read them all, as a forward would.
    assert all(p.sum().item() > 0 for p in span.parameters())
    loaded = sum(p.numel() * p.element_size() for p in span.parameters())
    print(json.dumps({"growth": peak_rss() - before, "loaded": loaded}))
""")


def write_big_checkpoint(out: str, layers: int = 8, blocks_per_shard: int = 2) -> int:
    """A llama checkpoint of ~24 MB blocks, two per shard; returns the bytes of one block."""
    config = LlamaConfig(vocab_size=384, hidden_size=768, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8)
    config.save_pretrained(out)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for key in shapes:
        block = int(key.split(".")[2]) if key.startswith("model.layers.") else -1
        groups.setdefault(f"model-{block // blocks_per_shard + 1:05d}.safetensors", []).append(key)
    for shard, keys in groups.items():
        save_file({k: torch.full(shapes[k], 0.01) for k in keys}, os.path.join(out, shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in groups.items() for k in keys}}
    with open(os.path.join(out, INDEX_FILE), "w") as f:
        json.dump(index, f)
    return sum(4 * shapes[k].numel() for k in shapes if k.startswith("model.layers.0."))


def test_one_block_span_does_not_materialise_the_others(tmp_path):
    out = str(tmp_path / "big")
    block_bytes = write_big_checkpoint(out)
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    assert total > 7 * block_bytes
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, out, "3"], capture_output=True, text=True,
                           timeout=120, check=True)
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["loaded"] == block_bytes
    # The block itself must show up (the measurement works), the seven others must not.
    assert 0.5 * block_bytes < result["growth"] < 2.5 * block_bytes, (result, total)
