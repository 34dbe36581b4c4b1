"""Blocks of unequal size: what each block of a model takes, how much of the model a server's memory holds,
and which block its speed is measured on."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe import modeling_qwen3_moe

from swarmtune.server import block_selection, throughput
from swarmtune.tiny_model import tiny_config


@pytest.fixture
def mixed_layers() -> Qwen3MoeConfig:
    """A Qwen3-MoE config whose first two layers are dense (`mlp_only_layers`), as DeepSeek-V3's first three are."""
    config = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_experts=16, num_experts_per_tok=2, num_hidden_layers=5, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, mlp_only_layers=[0, 1])
    config._attn_implementation = "sdpa"
    return config


def test_each_block_is_measured_for_its_own_layer(mixed_layers):
    sizes = throughput.block_bytes(mixed_layers, torch.bfloat16)
    with torch.device("meta"):
        expected = [2 * sum(p.numel() for p in modeling_qwen3_moe.Qwen3MoeDecoderLayer(mixed_layers, i).parameters())
                    for i in range(5)]
    assert list(sizes) == expected
    assert sizes[0] == sizes[1] < sizes[2] / 3 and sizes[2] == sizes[3] == sizes[4]
    assert throughput.largest_block(mixed_layers) == 2
    # quantization as served: the dense blocks' linear layers and the MoE blocks' fused experts both shrink
    nf4 = throughput.block_bytes(mixed_layers, torch.bfloat16, "nf4")
    assert nf4[0] < sizes[0] / 2 and nf4[2] < sizes[2] / 2
    assert block_selection.relative_sizes(throughput.block_sizes(mixed_layers))[0] == pytest.approx(
        sizes[0] / sizes[2], rel=1e-3)
    # a family whose blocks are alike: one size, so servers plan by count as before
    llama = tiny_config("llama", layers=4)
    assert len(set(throughput.block_bytes(llama, torch.float32))) == 1
    assert block_selection.relative_sizes(throughput.block_sizes(llama)) is None


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_the_memory_a_server_has_holds_the_blocks_of_any_span_its_capacity_gives_it(mixed_layers, monkeypatch, quant):
    dtype = torch.bfloat16
    own = throughput.block_bytes(mixed_layers, dtype, quant)
    usable = 2 * own[2] + 2 * own[0]  # two MoE blocks and the two dense ones
    monkeypatch.setattr(throughput, "free_bytes", lambda device: usable / throughput.MEMORY_FRACTION)
    capacity = throughput.capacity_that_fits(mixed_layers, dtype, "cpu", quant, reserve_bytes=0)
    sizes = block_selection.relative_sizes(throughput.block_sizes(mixed_layers))
    ends = block_selection.span_ends(capacity, 5, sizes)
    assert all(sum(own[start:end]) <= usable * (1 + 1e-9) for start, end in enumerate(ends))
    assert ends[2] == 4  # from an MoE block, two
    if quant == "none":  # from the first block, the dense ones as well
        assert ends[0] == 4 and capacity == pytest.approx(2 + 2 * own[0] / own[2])
    else:  # all servers plan with the blocks' parameters, which overstate the dense blocks' share in nf4: room is left
        assert ends[0] == 3
    # the count the first (dense) block gave before: memory for 2 MoE blocks taken for the whole model
    assert usable // own[0] >= 5


def test_speed_is_measured_on_the_largest_block(mixed_layers):
    span = throughput._random_block(mixed_layers, torch.float32, "cpu")
    assert (span.start, span.end) == (2, 3)
    assert isinstance(span.blocks[0].mlp, modeling_qwen3_moe.Qwen3MoeSparseMoeBlock)
    assert "layer=2" in throughput.cache_key(mixed_layers, torch.float32, "cpu")
    assert "layer=" not in throughput.cache_key(tiny_config("llama", layers=2), torch.float32, "cpu")
    measured = throughput.measure(mixed_layers, torch.float32, "cpu")
    assert measured.forward > 0 and measured.inference > 0
