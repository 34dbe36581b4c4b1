"""The GPU server path, checked on CPU: the benchmark runs (so it cannot rot before a GPU session
uses it), the decode path equals plain transformers, the fixed-shape step equals the normal one,
and the server sizes its KV budget and span from free memory consistently.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from benchmarks import gpu_server
from swarmtune.models import get_family, load_span
from swarmtune.server import cuda, throughput
from swarmtune.server.__main__ import build_parser, config_from_args
from swarmtune.server.quantize import block_bytes, quantize
from swarmtune.server.server import Server, ServerConfig
from swarmtune.server.sessions import CacheEdits, Lease, ServerSession, static_steps_apply
from swarmtune.tiny_model import tiny_config

GiB = 1 << 30


@pytest.mark.parametrize("sections", [
    [s for s in gpu_server.SECTIONS if s != "swarm"],  # e2e still serves its blocks from a server process
    pytest.param(list(gpu_server.SECTIONS), marks=pytest.mark.slow),  # swarm: two swarms (bf16, nf4), a minute
], ids=["but-swarm", "all"])
def test_small_benchmark_runs_on_cpu(tmp_path, sections):
    out = tmp_path / "rows.json"
    args = ["--small", "--device", "cpu", "--no-enforce", "--sections", ",".join(sections), "--json", str(out)]
    assert gpu_server.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["section"] for r in rows} == set(sections)
    assert not [r for r in rows if r["ok"] is False and r["check"]], "a correctness check failed"
    measured = {r["name"]: r for r in rows if r["value"] is not None}
    ours = measured["bf16 decode per block, normal step (SpanModel + SpanKVCache)"]
    assert ours["value"] > 0 and ours["baseline"] > 0
    assert any(r["section"] == "e2e" and r["unit"] == "steps/s" for r in measured.values())
    assert any(r["section"] == "offload" and r["unit"] == "steps/s" for r in measured.values())


def test_small_benchmark_enforces_correctness_but_not_speed(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_server, "DECODE_TARGET_MS", 1e-9)  # a speed miss: reported, not enforced
    assert gpu_server.main(["--small", "--device", "cpu", "--sections", "decode"]) == 0
    monkeypatch.setattr(gpu_server, "TOLERANCE", {dtype: -1.0 for dtype in gpu_server.TOLERANCE})
    assert gpu_server.main(["--small", "--device", "cpu", "--sections", "decode"]) == 1


# ---- the decode path against plain transformers -------------------------------------------------


def _decode_dtype() -> torch.dtype:
    try:
        torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)
        return torch.bfloat16
    except RuntimeError:
        return torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, _decode_dtype()], ids=str)
@torch.inference_mode()
def test_decode_path_equals_transformers_with_dynamic_cache(dtype):
    """Prefill a left-padded batch, then decode token by token: SpanModel + SpanKVCache vs LlamaModel + DynamicCache."""
    torch.manual_seed(0)
    plan = gpu_server.SMALL
    model = gpu_server.build_model(plan, dtype, torch.device("cpu"))
    span = gpu_server.span_of(model)
    prompt_len, steps = 6, 5
    mask = torch.ones(2, prompt_len, dtype=torch.long)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = torch.randn(2, prompt_len, plan.hidden, dtype=dtype)
    ours_cache, hf_cache = span.make_cache(2, prompt_len + steps), DynamicCache()
    tol = gpu_server.TOLERANCE[dtype]
    for step in range(steps + 1):
        hf = model.model(inputs_embeds=hidden, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{gpu_server.CACHE_KWARG: hf_cache}).last_hidden_state
        ours = model.model.norm(span(hidden, mask, positions, cache=ours_cache))
        real = mask[:, -hidden.shape[1]:].bool()
        assert gpu_server.relative_error(ours[real], hf[real]) <= tol, f"step {step}"
        hidden = torch.randn(2, 1, plan.hidden, dtype=dtype)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
    assert ours_cache.length == hf_cache.get_seq_length() == prompt_len + steps


# ---- the fixed-shape step -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@torch.inference_mode()
def test_static_step_equals_the_normal_step(tiny_llama, dtype):
    """Same outputs and cache as SpanModel.forward, through a beam reorder and a later multi-token step."""
    span = load_span(tiny_llama, 1, 5, dtype=dtype)
    torch.manual_seed(0)
    batch, prompt_len, steps = 2, 7, 6
    mask = torch.ones(batch, prompt_len, dtype=torch.long)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt = torch.randn(batch, prompt_len, span.config.hidden_size, dtype=span.compute_dtype)
    normal, fixed = (span.make_cache(batch, prompt_len + steps + 2) for _ in range(2))
    span(prompt, mask, positions, cache=normal)
    span(prompt, mask, positions, cache=fixed)
    step = cuda.StaticStep(span, fixed, use_graph=True)  # no CUDA here: the graph request falls back to eager
    assert not step.graphs and not step.use_graph
    tol = 1e-5 if dtype == "fp32" else 1e-2
    for i in range(steps):
        if i == 3:  # beam search swaps the rows
            order = torch.tensor([1, 0])
            normal.reorder(order)
            fixed.reorder(order)
            mask, positions = mask[order], positions[order]
        token = torch.randn(batch, 1, span.config.hidden_size, dtype=span.compute_dtype)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        expected = span(token, mask, positions, cache=normal)
        assert gpu_server.relative_error(step(token, mask, positions), expected) <= tol, f"step {i}"
    length = normal.length
    assert fixed.length == length
    assert gpu_server.relative_error(fixed.keys[:, :, :, :length], normal.keys[:, :, :, :length]) <= tol
    chunk = torch.randn(batch, 2, span.config.hidden_size, dtype=span.compute_dtype)
    mask = torch.cat([mask, torch.ones(batch, 2, dtype=torch.long)], dim=1)
    positions = positions[:, -1:] + torch.arange(1, 3)
    assert gpu_server.relative_error(span(chunk, mask, positions, cache=fixed),
                                     span(chunk, mask, positions, cache=normal)) <= tol


def test_window_grows_in_powers_of_two_up_to_max_length():
    assert [cuda.window_for(n, 2000) for n in (1, 256, 257, 1024, 1025, 2000)] == [256, 256, 512, 1024, 2000, 2000]
    assert cuda.window_for(5, 40) == 40
    assert cuda.windows(2000) == [256, 512, 1024, 2000] and cuda.windows(40) == [40]
    assert {cuda.window_for(n, 2000) for n in range(1, 2001)} == set(cuda.windows(2000))


@torch.inference_mode()
def test_sessions_with_static_steps_equal_plain_sessions(tiny_llama, monkeypatch):
    """The server session's fixed-shape path (what CUDA servers replay as graphs) gives the plain path's
    outputs through windows that grow, padding, default positions, a rollback and a beam reorder."""
    monkeypatch.setattr(cuda, "MIN_WINDOW", 4)  # cross several windows in a few steps
    span = load_span(tiny_llama, 0, 4)
    lease = Lease("peer", 0, None)
    plain, static = (ServerSession(span, 2, 40, None, None, lease, static_steps=s) for s in (False, True))
    assert plain.static is None and static.static is not None
    torch.manual_seed(0)
    hidden = lambda n: torch.randn(2, n, span.config.hidden_size)  # noqa: E731
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    prompt = hidden(5)
    for a, b in [(plain.step(prompt, mask, None), static.step(prompt, mask, None))]:
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # multi-token steps take the same path
    for i in range(14):
        edits = CacheEdits(truncate=plain.length - 2) if i == 6 else \
            CacheEdits(reorder=torch.tensor([1, 0])) if i == 9 else None
        token = hidden(1)
        expected = plain.step(token, None, None, edits)
        torch.testing.assert_close(static.step(token, None, None, edits), expected, rtol=1e-5, atol=1e-5)
    assert static.static is not None and static.length == plain.length


@pytest.mark.parametrize("quant", ["none", "nf4", "int8"])
def test_only_int8_spans_are_never_captured(tiny_llama, quant):
    """bitsandbytes' int8 matmul broke CUDA graph capture on an H200: such sessions step normally."""
    span = load_span(tiny_llama, 0, 2, dtype="bf16")
    span.blocks = torch.nn.ModuleList(quantize(block, quant, span.compute_dtype, "cpu") for block in span.blocks)
    assert cuda.capturable(span) == (quant != "int8")
    assert static_steps_apply(span, None, None) == (quant != "int8")


@pytest.mark.parametrize("family", ["mistral", "mixtral", "bloom"])
def test_static_step_refuses_windows_experts_and_alibi(tiny_models, family):
    span = load_span(tiny_models(family), 0, 1)
    assert not cuda.supports_static_step(span)
    with pytest.raises(ValueError, match="no static step"):
        cuda.StaticStep(span, span.make_cache(1, 4))


def test_configure_leaves_cpu_processes_alone():
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.get_float32_matmul_precision())
    cuda.configure("cpu")
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.get_float32_matmul_precision()) == before


# ---- sizing from free memory --------------------------------------------------------------------


def _sizes(config, dtype=torch.bfloat16) -> tuple[int, int]:
    """(bytes of one block, bytes of the KV room that --cache-mb auto keeps per block)."""
    with torch.device("meta"):
        block = get_family("llama").block_class(config, 0)
    kv_room = throughput.AUTO_CACHE_TOKENS * throughput.kv_bytes_per_token(config, dtype)
    return block_bytes(block, "none", dtype), kv_room


def test_free_bytes_on_cpu_is_available_ram():
    assert throughput.free_bytes("cpu") > 0


def test_blocks_that_fit_keep_room_for_an_auto_cache(monkeypatch):
    config = tiny_config("llama", layers=80, hidden=256)
    one_block, kv = _sizes(config)
    free = int((7 * (one_block + kv) + one_block // 2) / throughput.MEMORY_FRACTION)
    monkeypatch.setattr(throughput, "free_bytes", lambda device: free)
    assert int(throughput.capacity_that_fits(config, torch.bfloat16, "cpu", "none", reserve_bytes=None)) == 7
    fixed = throughput.capacity_that_fits(config, torch.bfloat16, "cpu", "none", reserve_bytes=0)
    assert int(fixed) == int(free * throughput.MEMORY_FRACTION // one_block) > 7
    monkeypatch.setattr(throughput, "free_bytes", lambda device: 1 << 50)
    assert throughput.capacity_that_fits(config, torch.bfloat16, "cpu", "none", reserve_bytes=None) == 80


@pytest.mark.parametrize("free_gib", [24, 80, 141])
def test_auto_cache_gets_what_auto_blocks_left(free_gib):
    """Serving as many blocks as fit, then sizing the cache from what is left, gives each block its KV room."""
    one_block, kv = _sizes(gpu_server.llama_config(gpu_server.FULL))  # Llama-2-70B blocks
    free = free_gib * GiB
    count = int(free * throughput.MEMORY_FRACTION // (one_block + kv))
    cache = throughput.auto_cache_bytes(free, free - count * one_block)
    assert count * kv <= cache < count * kv + one_block + kv
    assert throughput.auto_cache_bytes(free, free - count * one_block - cache) == 0  # nothing left: no cache


def test_server_cache_budget_from_free_memory(monkeypatch):
    server = Server(ServerConfig(model="unused", cache_bytes=None))
    server.blocks = (0, 4)
    monkeypatch.setattr(throughput, "free_bytes", lambda device: 30 * GiB)
    assert server.cache_budget(free_before=40 * GiB) == 22 * GiB  # 30 - (1 - 0.8) * 40
    with pytest.raises(RuntimeError, match="serve fewer blocks"):
        server.cache_budget(free_before=200 * GiB)
    assert Server(ServerConfig(model="unused", cache_bytes=64 << 20)).cache_bytes == 64 << 20  # given: not measured


def test_cache_mb_option():
    def parse(*extra: str) -> ServerConfig:
        return config_from_args(build_parser().parse_args(["--model", "m", "--blocks", "0:2", "--new-swarm", *extra]))

    assert parse().cache_bytes == 256 << 20
    assert parse("--cache-mb", "auto").cache_bytes is None
    assert parse("--cache-mb", "1.5").cache_bytes == int(1.5 * 2**20)
    for bad in ("0", "-3", "lots", "nan"):
        with pytest.raises(SystemExit):
            parse("--cache-mb", bad)
