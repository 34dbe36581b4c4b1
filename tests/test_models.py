"""Spans of blocks loaded separately from disk, run one after another, equal the local transformers model.

Every supported family is checked in fp32 for a full prompt, a left-padded batch and incremental
decoding with one KV cache per span (prefill, then one token at a time) against `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config

from swarmtune.models import (
    ClientParts,
    SpanKVCache,
    SpanModel,
    get_family,
    load_client_parts,
    load_config,
    load_span,
    supported_model_types,
)
from swarmtune.models.kv_cache import ROLLBACK_TOKENS
from tests.helpers import FAMILIES, reference_model

TOL = 1e-5
SPANS = [(0, 2), (2, 5), (5, 6)]
# The first prompt is longer than mistral's sliding window (8), so the window is exercised.
PROMPTS = ["The swarm is a group of computers that share the work of running a model", "Once upon a time"]
NEW_TOKENS = 6


@dataclass
class Loaded:
    path: str
    reference: torch.nn.Module
    parts: ClientParts
    spans: list[SpanModel]
    ids: torch.Tensor    # [2, length], left-padded
    mask: torch.Tensor   # [2, length], 0 on padding


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tiny_models) -> Loaded:
    """One family's reference model, client parts and spans (each span loaded on its own from disk)."""
    path = tiny_models(request.param)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    spans = [load_span(path, start, end) for start, end in SPANS]
    return Loaded(path, reference_model(path), load_client_parts(path), spans, batch["input_ids"],
                  batch["attention_mask"])


def run_spans(m: Loaded, ids: torch.Tensor, caches: list[SpanKVCache] | None = None, **kwargs) -> torch.Tensor:
    """Logits of the client parts and every span, as a client chaining servers computes them."""
    hidden = m.parts.prepare_hidden(m.parts.embed_tokens(ids))
    for i, span in enumerate(m.spans):
        hidden = span(hidden, cache=caches[i] if caches else None, **kwargs)
    return m.parts.logits(hidden)


def generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate derives them from a left-padded mask."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def test_full_prompt_matches_reference(loaded: Loaded):
    ids = loaded.ids[:1]  # the longer prompt has no padding
    assert loaded.mask[0].all()
    expected = loaded.reference(input_ids=ids).logits
    actual = run_spans(loaded, ids)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= TOL


@torch.no_grad()
def test_left_padded_batch_matches_reference(loaded: Loaded):
    ids, mask = loaded.ids, loaded.mask
    assert mask[1].sum() < mask[0].sum() and mask[1, 0] == 0, "the second prompt must be left-padded"
    positions = generate_positions(mask)
    expected = loaded.reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    actual = run_spans(loaded, ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    assert (actual - expected)[real].abs().max().item() <= TOL
    # Padding must not leak into the short prompt: alone and unpadded, it gives the same logits.
    short = ids[1][real[1]][None]
    alone = loaded.reference(input_ids=short).logits[0]
    assert (actual[1][real[1]] - alone).abs().max().item() <= TOL


@torch.no_grad()
def test_incremental_decoding_matches_generate(loaded: Loaded):
    ids, mask = loaded.ids, loaded.mask
    out = loaded.reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                                    pad_token_id=0)
    expected_tokens = out.sequences[:, ids.shape[1]:]
    assert expected_tokens.shape[1] == NEW_TOKENS

    caches = [span.make_cache(len(ids), ids.shape[1] + NEW_TOKENS) for span in loaded.spans]
    step_ids, positions, tokens = ids, generate_positions(mask), []
    for step in range(NEW_TOKENS):
        logits = run_spans(loaded, step_ids, caches, attention_mask=mask, position_ids=positions)[:, -1]
        assert (logits - out.logits[step]).abs().max().item() <= TOL, f"step {step}"
        step_ids = logits.argmax(-1, keepdim=True)
        tokens.append(step_ids)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        positions = positions[:, -1:] + 1
    assert torch.equal(torch.cat(tokens, dim=1), expected_tokens)
    assert all(cache.length == ids.shape[1] + NEW_TOKENS - 1 for cache in caches)


def test_registry_lists_every_required_family():
    assert supported_model_types() == sorted(FAMILIES)
    for name in FAMILIES:
        family = get_family(name)
        assert family.model_type == name
        assert family.block_key_prefix(3).endswith(".3.")
        assert family.lora_targets


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="gpt2") as err:
        get_family("gpt2")
    assert all(name in str(err.value) for name in FAMILIES)

    GPT2Config(n_layer=2, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Unsupported model_type 'gpt2'") as err:
        load_config(str(tmp_path))
    assert all(name in str(err.value) for name in FAMILIES)


def test_span_bounds_are_checked(tiny_llama):
    for start, end in [(-1, 2), (3, 3), (4, 2), (5, 7)]:
        with pytest.raises(ValueError, match="outside"):
            load_span(tiny_llama, start, end)


@pytest.fixture(scope="module")
def llama_span(tiny_llama) -> SpanModel:
    return load_span(tiny_llama, 1, 4)


@torch.no_grad()
def test_deep_prompts_match_between_full_pass_and_incremental_decoding(llama_span: SpanModel):
    """Prompts sit at absolute positions [0, prefix): a decode step after the prefix must not add them again."""
    span, hidden_size = llama_span, llama_span.config.hidden_size
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, hidden_size, generator=g)
    prompts = torch.randn(span.num_blocks, 2, 3, hidden_size, generator=g)

    full = span(hidden, deep_prompts=prompts)
    assert (full - span(hidden)).abs().max() > 1e-2, "deep prompts must change the output"

    cache = span.make_cache(2, 7)
    steps = [span(hidden[:, a:b], cache=cache, deep_prompts=prompts) for a, b in [(0, 2), (2, 3), (3, 4), (4, 7)]]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= TOL


@torch.no_grad()
def test_kv_cache_size_overflow_and_reorder(llama_span: SpanModel):
    span = llama_span
    cache = span.make_cache(2, 5)
    assert cache.nbytes == span.make_cache_nbytes(2, 5)
    assert cache.keys.shape[0] == span.num_blocks

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 4, span.config.hidden_size, generator=g)
    step = torch.randn(2, 1, span.config.hidden_size, generator=g)
    expected = span(torch.cat([hidden, step], dim=1))[:, -1:]
    span(hidden, cache=cache)
    cache.reorder(torch.tensor([1, 0]))  # rows become (second, first), as beam search reorders them
    swapped = span(step.flip(0), cache=cache)
    assert (swapped - expected.flip(0)).abs().max().item() <= TOL

    with pytest.raises(ValueError, match="overflow"):
        span(step, cache=cache)


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_spans_stay_close_to_fp32(tiny_llama, llama_span: SpanModel, dtype: str):
    half = load_span(tiny_llama, 1, 4, dtype=dtype)
    assert {p.dtype for p in half.parameters()} == {half.compute_dtype}
    assert half.compute_dtype != torch.float32
    hidden = torch.randn(1, 5, half.config.hidden_size, generator=torch.Generator().manual_seed(2))
    expected = llama_span(hidden)
    actual = half(hidden.to(half.compute_dtype)).float()
    assert (actual - expected).abs().max().item() <= 0.05 * expected.abs().max().item()


@torch.no_grad()
def test_glm4_moe_router_stays_fp32_in_half_precision(tiny_models):
    """As transformers keeps them (_keep_in_fp32_modules_strict): the router's weight and expert bias."""
    path = tiny_models("glm4_moe")
    span = load_span(path, 0, 3, dtype="bf16")
    fp32 = {name for name, t in span.state_dict().items() if t.dtype == torch.float32}
    assert fp32 == {f"blocks.{i}.mlp.gate.{name}" for i in (1, 2) for name in ("weight", "e_score_correction_bias")}
    assert span.blocks[1].mlp.gate.e_score_correction_bias.abs().max() > 0  # the tiny model's is random
    hidden = torch.randn(1, 5, span.config.hidden_size, generator=torch.Generator().manual_seed(3))
    expected = load_span(path, 0, 3)(hidden)
    assert (span(hidden.bfloat16()).float() - expected).abs().max().item() <= 0.05 * expected.abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("family", ["gpt_oss", pytest.param("mistral", marks=pytest.mark.slow)])
def test_sliding_blocks_keep_only_their_window_and_decode_exactly(tiny_models, family: str):
    """A decode far past the sliding window (gpt-oss: alternate layers of window 4; mistral: every layer, 8) equals
    transformers' generate step by step while each sliding block keeps window - 1 + ROLLBACK_TOKENS tokens, and
    is charged that; a rollback of ROLLBACK_TOKENS re-run as one multi-token step gives the same logits, and
    a longer one is refused."""
    path = tiny_models(family)
    m = Loaded(path, reference_model(path), load_client_parts(path), [load_span(path, s, e) for s, e in SPANS],
               torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(4)), torch.ones(2, 12).long())
    m.mask[1, :3] = 0  # left padding
    window = m.reference.config.sliding_window
    kept = window - 1 + ROLLBACK_TOKENS
    new_tokens = kept + 4 - m.ids.shape[1]  # the window moves on for the last 4 steps
    out = m.reference.generate(input_ids=m.ids, attention_mask=m.mask, max_new_tokens=new_tokens, do_sample=False,
                               output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    max_length = m.ids.shape[1] + new_tokens
    caches = [span.make_cache(2, max_length) for span in m.spans]
    per_token = get_family(family).cache_shape(m.reference.config).nbytes_per_token(torch.float32)
    windows = [window for span in m.spans for window in span.windows]
    assert None not in windows if family == "mistral" else windows[:2] == [window, None]  # gpt-oss alternates
    for span, cache in zip(m.spans, caches):
        sliding = sum(window is not None for window in span.windows)
        expected = 2 * per_token * ((span.num_blocks - sliding) * max_length + sliding * kept)
        assert cache.nbytes == span.make_cache_nbytes(2, max_length) == expected
        assert span.make_cache_nbytes(2, 10 * max_length) - expected == (span.num_blocks - sliding) * 2 * per_token \
            * 9 * max_length  # a longer session costs more only in its full-attention blocks

    step_ids, mask, positions = m.ids, m.mask, generate_positions(m.mask)
    for step in range(new_tokens):
        logits = run_spans(m, step_ids, caches, attention_mask=mask, position_ids=positions)[:, -1]
        assert (logits - out.logits[step]).abs().max().item() <= TOL, f"step {step}"
        step_ids = logits.argmax(-1, keepdim=True)
        assert torch.equal(step_ids[:, 0], out.sequences[:, m.ids.shape[1] + step])
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        positions = positions[:, -1:] + 1
    length = max_length - 1
    for span, cache in zip(m.spans, caches):
        assert cache.length == length
        assert {cache.kept(i) for i in range(span.start, span.end)} <= {kept, length}
        assert cache.shortest_truncation == (length - ROLLBACK_TOKENS if any(span.windows) else 0)

    back = length - ROLLBACK_TOKENS  # as speculative decoding drops rejected drafts, then verifies them anew
    for cache in caches:
        cache.truncate(back)
    tokens = out.sequences[:, back:length]
    replayed = run_spans(m, tokens, caches, attention_mask=mask[:, :length],
                         position_ids=generate_positions(mask[:, :length])[:, back:])
    first = max(back, m.ids.shape[1] - 1)  # the first column whose logits generate returned
    expected = torch.stack(out.logits[first - m.ids.shape[1] + 1:], dim=1)
    assert (replayed[:, first - back:] - expected).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="shortest"):
        caches[0].truncate(back - 1)
