"""8-bit and 4-bit blocks on CPU: close to full precision, LoRA on top works, and servers announce it."""

from __future__ import annotations

import pytest
import torch

from swarmtune.models import load_span
from swarmtune.server import compute
from swarmtune.server.lora import LoraSet, wrap_targets
from swarmtune.server.quantize import QuantizedExperts, block_bytes, quantize
from tests.helpers import MOE_FAMILIES

# relative error against fp32 of a 6-block tiny llama's output (measured about 3e-4 and 5e-3; with LoRA on
# q_proj and down_proj 2.5e-3 and 3.7e-2) and of the LoRA gradients (measured about 1e-2 and 0.13-0.19)
TOLERANCE = {"int8": 2e-2, "nf4": 5e-2}
GRAD_TOLERANCE = {"int8": 5e-2, "nf4": 0.35}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def full(tiny_llama):
    return load_span(tiny_llama, 0, 6)


@pytest.fixture(scope="module", params=["int8", "nf4"])
def quantized(request, tiny_llama):
    span = quantize(load_span(tiny_llama, 0, 6), request.param, torch.float32, "cpu")
    return request.param, span


def test_quantized_span_is_close_to_full_precision(full, quantized):
    quant, span = quantized
    hidden = torch.randn(2, 9, full.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert _rel(span(hidden), full(hidden)) < TOLERANCE[quant]
    assert "Linear8bitLt" in str(span) if quant == "int8" else "Linear4bit" in str(span)


def test_quantized_decode_matches_quantized_prefill(quantized):
    """The KV-cache path gives what one full pass gives, on the same quantized weights."""
    _, span = quantized
    hidden = torch.randn(1, 8, span.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = span(hidden)
        cache = span.make_cache(1, 8)
        steps = torch.cat([span(hidden[:, :5], cache=cache)] + [span(hidden[:, i:i + 1], cache=cache)
                                                                 for i in range(5, 8)], dim=1)
    assert _rel(steps, whole) < 1e-3


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_lora_on_quantized_blocks(tiny_llama, quant):
    """Client LoRA runs in the compute dtype on top of quantized layers, with gradients, close to full precision."""
    base = load_span(tiny_llama, 0, 6)
    wrap_targets(base.blocks, 0, ("self_attn.q_proj", "mlp.down_proj"))
    quant_span = quantize(load_span(tiny_llama, 0, 6), quant, torch.float32, "cpu")
    wrap_targets(quant_span.blocks, 0, ("self_attn.q_proj", "mlp.down_proj"))
    g = torch.Generator().manual_seed(2)
    weights = {f"{b}.{path}": (torch.randn(4, n_in, generator=g), torch.randn(64, 4, generator=g) * 0.2)
               for b in range(6) for path, n_in in (("self_attn.q_proj", 64), ("mlp.down_proj", 128))}
    lora = LoraSet(weights, scale=2.0)
    hidden = torch.randn(2, 6, 64, generator=g)
    grad_out = torch.randn(2, 6, 64, generator=g)
    with_lora = compute.forward(quant_span, hidden, None, None, None, lora)
    without = compute.forward(quant_span, hidden, None, None, None, None)
    reference = compute.forward(base, hidden, None, None, None, lora)
    assert _rel(with_lora, reference) < TOLERANCE[quant]
    assert _rel(with_lora, without) > 0.05  # the adapter does change the output
    _, _, grads = compute.backward(quant_span, hidden, None, None, None, lora, grad_out)
    _, _, ref_grads = compute.backward(base, hidden, None, None, None, lora, grad_out)
    for got, expected in zip(grads, ref_grads):
        assert _rel(got, expected) < GRAD_TOLERANCE[quant]


@pytest.mark.parametrize("quant", ["int8", "nf4"])
@pytest.mark.parametrize("family", ["mixtral", *MOE_FAMILIES])
def test_moe_experts_are_quantized(tiny_models, family, quant):
    """Routed experts (fused 3D parameters, not linear layers, in transformers 5.x) are stored quantized too,
    nf4 bit for bit as bitsandbytes quantizes each expert's matrix; outputs and input gradients stay close."""
    path = tiny_models(family)
    full = load_span(path, 0, 6)
    span = quantize(load_span(path, 0, 6), quant, torch.float32, "cpu")
    assert not any(p.ndim == 3 for p in span.parameters())
    experts = span.blocks[2].mlp.experts
    assert isinstance(experts.gate_up_proj, QuantizedExperts) and isinstance(experts.down_proj, QuantizedExperts)
    original = full.blocks[2].mlp.experts.gate_up_proj
    if quant == "nf4":
        import bitsandbytes as bnb

        for i in range(original.shape[0]):
            packed, state = bnb.functional.quantize_4bit(original[i].contiguous(), blocksize=64, quant_type="nf4")
            assert torch.equal(experts.gate_up_proj[i], bnb.functional.dequantize_4bit(packed, state))
    assert _rel(experts.gate_up_proj[1], original[1]) < {"int8": 1e-2, "nf4": 0.12}[quant]
    assert block_bytes(full.blocks[2], quant, torch.float32) < block_bytes(full.blocks[2], "none", torch.float32) / 3

    hidden = torch.randn(2, 9, full.config.hidden_size, generator=torch.Generator().manual_seed(4))
    ours, theirs = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    out, expected = span(ours), full(theirs)
    assert _rel(out, expected) < TOLERANCE[quant]
    out.square().sum().backward()
    expected.square().sum().backward()
    assert _rel(ours.grad, theirs.grad) < GRAD_TOLERANCE[quant]


def test_block_bytes_shrink(full):
    fp32 = block_bytes(full.blocks[0], "none", torch.float32)
    assert block_bytes(full.blocks[0], "int8", torch.float32) < fp32 / 3
    assert block_bytes(full.blocks[0], "nf4", torch.float32) < fp32 / 5


def test_quantized_servers_announce_and_serve(tiny_llama):
    from swarmtune.client.model import SwarmForCausalLM
    from swarmtune.local_swarm import LocalSwarm
    from tests.helpers import reference_model

    with LocalSwarm(tiny_llama, spans=[(0, 3), (3, 6)], per_server=[{"quant": "int8"}, {"quant": "nf4"}]) as swarm:
        model = SwarmForCausalLM.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers)
        try:
            assert sorted(s.quant for s in model.connection.view.servers.values()) == ["int8", "nf4"]
            ids = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                logits = model(input_ids=ids).logits
                expected = reference_model(tiny_llama)(input_ids=ids).logits
            assert _rel(logits, expected) < 0.3  # logits of a random tiny model amplify 4-bit noise (measured 0.11)
            out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
            assert out.shape == (1, 15)
        finally:
            model.close()
