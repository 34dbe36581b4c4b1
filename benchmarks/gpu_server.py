"""GPU server figures: a span of Llama-2-70B-shaped blocks, and a whole swarm, against plain transformers.

Random weights; block shape hidden 8192, 64 heads, 8 KV heads, MLP 28672; 8 blocks (~14 GB bf16).

- decode: bf16 single-token steps at batch 1 after 512 tokens of context, per block: the normal
  step (SpanModel + SpanKVCache, all blocks in one call), the fixed-shape step with and without a
  CUDA graph (swarmtune.server.cuda.StaticStep: what servers run on CUDA), transformers eager
  (LlamaModel with DynamicCache) and a bandwidth floor (the blocks' seven matrix-vector products,
  chained); also nf4 and int8 blocks (bitsandbytes). Targets: the server's step <= 0.6 ms per
  block in bf16; nf4 no slower than bf16.
- train: forward + backward w.r.t. the inputs of 8 x 512 tokens in TFLOP/s-equivalent, ours
  (server.compute.backward) beside transformers. Target >= 450.
- e2e: a server process (python -m swarmtune.server --device cuda --dtype bf16 --cache-mb auto)
  holding the 8 blocks, written as a checkpoint to a temporary folder, driven from this process
  through an InferenceSession over loopback, beside the same blocks stepped in this process by
  the server's own session code (with and without CUDA graphs). Target: >= 80% of the in-process
  steps/s with the server's step.
- offload: the paper's other baseline, the same blocks in pinned host memory copied to the GPU
  block by block at every step, in steps/s beside the swarm.
- swarm: a Llama-2-7B-shaped model (32 blocks of hidden 4096) in two server processes (bf16, then
  nf4), a client on the GPU generating greedily through them, beside transformers generating
  in-process. Target: >= 80% of transformers' steps/s.

Correctness checks (our outputs against transformers' and each other's) fail the run on any
device; the speed targets unless --small or --no-enforce is given. Exits 1 when something failed
or a target was missed. benchmarks/GPU.md has the device call (benchmarks/gpu_check.sh) and the
measured table. On a CPU with tiny shapes (what tests/test_gpu_bench.py runs):

    python -m benchmarks.gpu_server --small --device cpu --no-enforce
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib.util
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaModel

from swarmtune import shutdown
from swarmtune.models import SpanKVCache, SpanModel, get_family
from swarmtune.server import compute, cuda
from swarmtune.server.quantize import quantize
from swarmtune.server.sessions import Lease, ServerSession

SECTIONS = ("decode", "quant", "train", "e2e", "offload", "swarm")
DECODE_TARGET_MS = 0.6          # per block, bf16, batch 1, 512 tokens of context
TRAIN_TARGET_TFLOPS = 450.0
E2E_TARGET_RATIO = 0.8          # swarm steps/s over in-process steps/s
WARMUP = 3                      # untimed calls before every timed series
VOCAB = 128                     # the checkpoint's embeddings and head are not benchmarked: keep them small
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # relative, as servers cross-check
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# transformers renamed past_key_values to cache during 5.x: pass whichever this version takes.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class SwarmShapes:
    """The whole-swarm section's model: Llama-2-7B's shape (no grouped KV heads)."""

    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 32
    mlp: int = 11008
    blocks: int = 32
    vocab: int = 32000
    prompt: int = 128
    new_tokens: int = 64
    cache_mb: int = 4096            # per server: two share the GPU, so no --cache-mb auto race


@dataclass(frozen=True)
class Shapes:
    hidden: int = 8192
    heads: int = 64
    kv_heads: int = 8
    mlp: int = 28672
    blocks: int = 8
    context: int = 512
    decode_steps: int = 32
    train_shape: tuple[int, int] = (8, 512)
    train_calls: int = 5
    e2e_steps: int = 32
    e2e_rounds: int = 3             # swarm and in-process series alternate, so both see the same conditions
    offload_steps: int = 3
    start_timeout: float = 300.0    # for a server process: loading 14 GB
    swarm: SwarmShapes = SwarmShapes()


FULL = Shapes()
SMALL = Shapes(hidden=64, heads=4, kv_heads=2, mlp=128, blocks=2, context=16, decode_steps=4, train_shape=(2, 16),
             train_calls=2, e2e_steps=4, e2e_rounds=2, offload_steps=2, start_timeout=120.0,
             swarm=SwarmShapes(hidden=64, heads=4, kv_heads=4, mlp=128, blocks=4, vocab=128, prompt=8, new_tokens=4,
                               cache_mb=16))


@dataclass
class Row:
    """One figure beside its same-run baseline; `check` rows are correctness checks, enforced everywhere."""

    section: str
    name: str
    value: float | None             # None: skipped or failed, see note
    unit: str = ""
    baseline: float | None = None
    baseline_name: str = ""
    target: str = ""
    ok: bool | None = None          # None: no target
    check: bool = False
    note: str = ""


# ---- timing -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn: Callable[[], object], calls: int, device: torch.device) -> tuple[object, list[float]]:
    """The first call's result and the seconds of each call, each waited for (as a server waits to reply).

    On CUDA, events time each call from before its first launch to the end of its last kernel,
    so launch overhead counts whenever the GPU would otherwise wait for it.
    """
    sync(device)
    first, times = None, []
    for i in range(calls):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - began)
        if i == 0:
            first = result
    return first, times


def wall_times(fn: Callable[[], object], calls: int) -> list[float]:
    """Seconds of each call by the wall clock (for calls that return host tensors, hence wait anyway)."""
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return times


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[WARMUP:])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float().cpu(), expected.float().cpu()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


def check_row(section: str, name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> Row:
    error, tol = relative_error(actual, expected), TOLERANCE[dtype]
    return Row(section, name, error, "rel. error", target=f"<= {tol:g}", ok=error <= tol, check=True)


@contextlib.contextmanager
def cudnn_sdpa(enabled: bool) -> Iterator[None]:
    """Temporarily switch the cuDNN SDPA backend (what torch does by default vs what servers do)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- models -------------------------------------------------------------------------------------


def llama_config(shapes: Shapes | SwarmShapes, vocab: int = VOCAB) -> LlamaConfig:
    config = LlamaConfig(hidden_size=shapes.hidden, num_attention_heads=shapes.heads,
                         num_key_value_heads=shapes.kv_heads, intermediate_size=shapes.mlp,
                         num_hidden_layers=shapes.blocks, vocab_size=vocab,
                         max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return config


def build_model(shapes: Shapes, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """A random-weight LlamaForCausalLM of the shapes's block shape, made directly on `device` in `dtype`."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(shapes), dtype=dtype)
    return model.eval().requires_grad_(False)


def span_of(model: PreTrainedModel, blocks: nn.ModuleList | None = None) -> SpanModel:
    """Our span runtime over `blocks` (default: the model's own layers, sharing their weights)."""
    inner = model.model
    blocks = inner.layers if blocks is None else blocks
    return SpanModel(get_family("llama"), model.config, 0, len(blocks), blocks, inner.rotary_emb, model.dtype).eval()


def host_copy(block: nn.Module, config: LlamaConfig, index: int) -> nn.Module:
    """A CPU copy of `block`, as quantize() takes it (bitsandbytes quantizes on the move to the device)."""
    with torch.device("meta"):
        clone = get_family("llama").block_class(config, index)
    clone.load_state_dict({k: v.to("cpu", copy=True) for k, v in block.state_dict().items()}, assign=True)
    return clone.eval()


def prefilled(span: SpanModel, prompt: torch.Tensor, new_tokens: int) -> SpanKVCache:
    """A cache holding `prompt`'s keys and values, with room for `new_tokens` more."""
    cache = span.make_cache(prompt.shape[0], prompt.shape[1] + new_tokens)
    span(prompt, cache=cache)
    return cache


def hf_decoder(model: PreTrainedModel, prompt: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Plain transformers decoding: LlamaModel with a DynamicCache, prefilled with `prompt`."""
    cache = DynamicCache()
    model.model(inputs_embeds=prompt, use_cache=True, **{CACHE_KWARG: cache})
    return lambda token: model.model(inputs_embeds=token, use_cache=True, **{CACHE_KWARG: cache}).last_hidden_state


def gemv_chain(blocks: nn.ModuleList) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """The blocks' seven weight matrices each read once by a matrix-vector product, one after another:
    the bandwidth floor of a decode step. Returns the chain and the bytes it reads."""
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
    weights = [[block.get_submodule(name).weight for name in names] for block in blocks]

    def run(x: torch.Tensor) -> torch.Tensor:
        for q, k, v, o, gate, up, down in weights:
            F.linear(x, k)
            F.linear(x, v)
            F.linear(x, gate)
            x = F.linear(F.linear(F.linear(F.linear(x, q), o), up), down)
        return x

    return run, sum(w.nbytes for ws in weights for w in ws)


# ---- decode -------------------------------------------------------------------------------------


def decode_section(model: PreTrainedModel, shapes: Shapes, device: torch.device, found: dict) -> list[Row]:
    span, dtype = span_of(model), model.dtype
    prompt = torch.randn(1, shapes.context, shapes.hidden, dtype=dtype, device=device)
    token = torch.randn(1, 1, shapes.hidden, dtype=dtype, device=device)
    calls = WARMUP + shapes.decode_steps

    def per_block_ms(times: list[float]) -> float:
        return 1e3 * median_after_warmup(times) / shapes.blocks

    rows = []
    with torch.inference_mode():
        with cudnn_sdpa(True):
            hf = hf_decoder(model, prompt)
            _, hf_default_times = timed_calls(lambda: hf(token), calls, device)
        hf = hf_decoder(model, prompt)
        hf_first, hf_times = timed_calls(lambda: hf(token), calls, device)
        cache = prefilled(span, prompt, calls)
        ours_first, ours_times = timed_calls(lambda: span(token, cache=cache), calls, device)
        ours_ms, hf_ms = per_block_ms(ours_times), per_block_ms(hf_times)
        rows += [
            Row("decode", f"{DTYPE_NAMES[dtype]} decode per block, normal step (SpanModel + SpanKVCache)", ours_ms,
                "ms", hf_ms, "transformers eager + DynamicCache",
                note=f"batch 1, {shapes.context} tokens of context, {shapes.blocks} blocks per call; server settings "
                     f"(cuDNN SDPA off) for both"),
            Row("decode", "transformers decode per block, server settings (cuDNN SDPA off)", hf_ms, "ms",
                per_block_ms(hf_default_times), "transformers, torch defaults (cuDNN SDPA on)"),
            check_row("decode", "decode output, ours vs transformers", model.model.norm(ours_first), hf_first, dtype),
        ]
        chain, nbytes = gemv_chain(span.blocks)
        x = token[0]
        _, chain_times = timed_calls(lambda: chain(x), calls, device)
        chain_ms = per_block_ms(chain_times)
        rows.append(Row("decode", "bandwidth floor per block: 7 GEMVs chained", chain_ms, "ms", ours_ms,
                        "ours (normal step)", note=f"{nbytes / median_after_warmup(chain_times) / 1e9:.0f} GB/s"))
        static, graph_ms = static_rows(span, prompt, token, ours_first, ours_ms, calls, device)
    server_ms = graph_ms if graph_ms is not None else ours_ms
    found["decode_bf16_ms"] = server_ms
    rows.append(Row("decode", f"{DTYPE_NAMES[dtype]} decode per block, the server's step ({server_step(device)})",
                    server_ms, "ms", hf_ms, "transformers eager + DynamicCache", f"<= {DECODE_TARGET_MS}",
                    server_ms <= DECODE_TARGET_MS, note=f"bandwidth floor {chain_ms:.3g} ms"))
    return rows + static


def server_step(device: torch.device, quant: str = "none") -> str:
    """How a server steps single tokens: CUDA graphs of the fixed-shape step on CUDA (not for int8)."""
    return "fixed-shape step + CUDA graph" if device.type == "cuda" and quant != "int8" else "normal step"


def static_rows(span: SpanModel, prompt: torch.Tensor, token: torch.Tensor, ours_first: torch.Tensor,
                ours_ms: float, calls: int, device: torch.device,
                graph: bool = True) -> tuple[list[Row], float | None]:
    """The fixed-shape step, eager and (CUDA only) replayed from a CUDA graph, beside our normal step;
    also the graph step's ms per block (None where it did not run)."""
    rows, graph_ms = [], None
    for use_graph in (False, True):
        name = "decode per block, fixed-shape step" + (" + CUDA graph" if use_graph else "")
        if use_graph and (device.type != "cuda" or not graph):
            why = "CUDA graphs need a CUDA device" if device.type != "cuda" else "its kernels cannot be captured"
            rows.append(Row("decode", name, None, note=f"skipped: {why}"))
            continue
        cache = prefilled(span, prompt, calls)
        step = cuda.StaticStep(span, cache, use_graph=use_graph)

        def call(cache=cache, step=step) -> torch.Tensor:
            length = cache.length
            mask = torch.ones(1, length + 1, dtype=torch.long, device=device)
            return step(token, mask, torch.full((1, 1), length, device=device))

        try:
            first, times = timed_calls(call, calls, device)
        except Exception as e:  # a capture failure is a finding to report, not a reason to stop
            traceback.print_exc()
            rows.append(Row("decode", name, None, ok=False, check=True, note=f"failed: {type(e).__name__}: {e}"))
            continue
        ms = 1e3 * median_after_warmup(times) / span.num_blocks
        graph_ms = ms if use_graph else graph_ms
        rows += [Row("decode", name, ms, "ms", ours_ms, "ours (normal step)"),
                 check_row("decode", f"{name}: output vs normal step", first, ours_first, span.compute_dtype)]
    return rows, graph_ms


def quant_section(model: PreTrainedModel, shapes: Shapes, device: torch.device, found: dict) -> list[Row]:
    """nf4 and int8 copies of the blocks (bitsandbytes), decoding as in decode_section."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return [Row("quant", "nf4 / int8 decode", None, note="skipped: bitsandbytes is not installed")]
    bf16_ms = found.get("decode_bf16_ms")
    prompt = torch.randn(1, shapes.context, shapes.hidden, dtype=model.dtype, device=device)
    token = torch.randn(1, 1, shapes.hidden, dtype=model.dtype, device=device)
    calls = WARMUP + shapes.decode_steps
    rows = []
    for quant in ("nf4", "int8"):
        blocks = nn.ModuleList(quantize(host_copy(block, model.config, i), quant, model.dtype, device)
                               for i, block in enumerate(model.model.layers))
        span = span_of(model, blocks)
        with torch.inference_mode():
            cache = prefilled(span, prompt, calls)
            first, times = timed_calls(lambda span=span, cache=cache: span(token, cache=cache), calls, device)
            ms = 1e3 * median_after_warmup(times) / shapes.blocks
            static, graph_ms = static_rows(span, prompt, token, first, ms, calls, device, graph=cuda.capturable(span))
        server_ms = graph_ms if graph_ms is not None else ms
        target = quant == "nf4" and bf16_ms is not None
        rows.append(Row("quant", f"{quant} decode per block, the server's step ({server_step(device, quant)})",
                        server_ms, "ms", bf16_ms, "bf16, the server's step", "<= bf16" if target else "",
                        (server_ms <= bf16_ms) if target else None, note=f"normal step {ms:.3g} ms"))
        rows += [dataclasses.replace(r, section="quant", name=f"{quant} {r.name}") for r in static]
        del span, blocks, cache
        free_memory(device)
    return rows


# ---- training -----------------------------------------------------------------------------------


def train_flops(model: PreTrainedModel, batch: int, length: int) -> float:
    """TFLOP/s-equivalent convention: 2 x params x tokens forward, 4 x backward, plus attention
    (QK^T and AV without the causal discount: 4 x batch x length^2 x hidden forward, 3x in all), per block."""
    params = sum(p.numel() for p in model.model.layers[0].parameters())
    per_block = 6 * params * batch * length + 12 * batch * length**2 * model.config.hidden_size
    return per_block * len(model.model.layers)


def hf_backward(model: PreTrainedModel, hidden: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    x = hidden.detach().requires_grad_(True)
    out = model.model(inputs_embeds=x, use_cache=False).last_hidden_state
    return torch.autograd.grad(out, x, grad_output)[0]


def train_section(model: PreTrainedModel, shapes: Shapes, device: torch.device, found: dict) -> list[Row]:
    span = span_of(model)
    batch, length = shapes.train_shape
    hidden = torch.randn(batch, length, shapes.hidden, dtype=model.dtype, device=device)
    grad = torch.randn_like(hidden)
    flops = train_flops(model, batch, length)
    calls = 1 + shapes.train_calls

    def tflops(fn: Callable[[], object]) -> float:
        _, times = timed_calls(fn, calls, device)
        return flops / statistics.median(times[1:]) / 1e12

    host_hidden, host_grad = hidden.cpu(), grad.cpu()
    hf = tflops(lambda: hf_backward(model, hidden, grad))
    ours = tflops(lambda: compute.backward(span, hidden, None, None, None, None, grad))
    ours_host = tflops(lambda: compute.backward(span, host_hidden, None, None, None, None, host_grad))
    shape = f"{batch} x {length} tokens through {shapes.blocks} blocks"
    return [
        Row("train", "fwd+bwd w.r.t. inputs, ours (compute.backward, inputs on the device)", ours, "TFLOP/s",
            hf, "transformers (LlamaModel + autograd.grad)", f">= {TRAIN_TARGET_TFLOPS:g}",
            ours >= TRAIN_TARGET_TFLOPS, note=shape),
        Row("train", "fwd+bwd, ours from host tensors (as a server gets them)", ours_host, "TFLOP/s", ours,
            "ours, inputs on the device", note="adds the copies of inputs and gradients to and from the device"),
    ]


# ---- end to end ---------------------------------------------------------------------------------


def e2e_section(model: PreTrainedModel, shapes: Shapes, device: torch.device, found: dict) -> list[Row]:
    """Steps/s through a server process over loopback vs the same blocks in this process, and what the
    fixed-shape step with CUDA graphs (the server's default on CUDA) gains inside a session."""
    if importlib.util.find_spec("hivemind") is None:
        return [Row("e2e", "server process vs in-process", None, note="skipped: hivemind is not installed")]
    from swarmtune.client.config import ClientConfig
    from swarmtune.client.connection import SwarmConnection
    from swarmtune.client.inference import InferenceSession
    from swarmtune.local_swarm import LocalSwarm

    calls = WARMUP + shapes.e2e_steps
    max_length = shapes.context + 1 + shapes.e2e_rounds * calls
    prompt = torch.randn(1, shapes.context, shapes.hidden)
    token = torch.randn(1, 1, shapes.hidden)
    graphs = device.type == "cuda"  # what a server does: graphs where there is CUDA
    local = {name: ServerSession(span_of(model), 1, max_length, None, None, Lease("local", 0, None),
                                 static_steps=static) for name, static in (("plain", False), ("server", graphs))}
    with tempfile.TemporaryDirectory(prefix="swarmtune-gpu-bench-") as tmp:
        path, logs = os.path.join(tmp, "model"), os.path.join(tmp, "logs")
        os.makedirs(logs)
        model.save_pretrained(path, max_shard_size="2GB")
        free_memory(device)
        options = dict(dtype=DTYPE_NAMES[model.dtype], device=str(device), cache_mb="auto", throughput=1.0)
        with LocalSwarm(path, spans=[(0, shapes.blocks)], log_dir=logs,
                        start_timeout=shapes.start_timeout, **options) as swarm:
            connection = SwarmConnection(ClientConfig(initial_peers=swarm.initial_peers), swarm.dht_prefix,
                                         shapes.blocks)
            try:
                with InferenceSession(connection, max_length, 1) as remote:
                    steppers = {"swarm": lambda: remote.step(token),
                                **{name: (lambda s=s: s.step(token, None, None, None)) for name, s in local.items()}}
                    remote.step(prompt)
                    for session in local.values():
                        session.step(prompt, None, None, None)
                    first = {name: step() for name, step in steppers.items()}
                    times: dict[str, list[float]] = {name: [] for name in steppers}
                    for _ in range(shapes.e2e_rounds):  # interleaved, so that all see the same conditions
                        for name, step in steppers.items():
                            times[name] += wall_times(step, calls)[WARMUP:]
            finally:
                connection.close()
            budget = [line.rsplit(": ", 1)[-1] for line in swarm.servers[0].lines if "KV cache budget" in line]
    rate = {name: 1 / statistics.median(t) for name, t in times.items()}
    found["swarm_steps_s"] = rate["swarm"]
    kv_budget = budget[-1] if budget else "?"
    note = f"batch 1, {shapes.blocks} blocks, context {shapes.context}+; server KV budget {kv_budget}"
    step_kind = "fixed-shape step + CUDA graphs" if graphs else "normal step"
    return [
        Row("e2e", "steps/s, server process via InferenceSession (loopback)", rate["swarm"], "steps/s",
            rate["server"], f"same blocks in-process (server session code, {step_kind})",
            f">= {E2E_TARGET_RATIO:g} x baseline", rate["swarm"] >= E2E_TARGET_RATIO * rate["server"], note=note),
        Row("e2e", f"steps/s in-process, session with {step_kind}", rate["server"], "steps/s", rate["plain"],
            "session with the normal step (--no-cuda-graphs)"),
        check_row("e2e", "step output, server process vs in-process", first["swarm"], first["plain"], model.dtype),
        check_row("e2e", f"step output, {step_kind} vs normal step", first["server"], first["plain"], model.dtype),
    ]


# ---- a whole swarm: two server processes, a client generating -------------------------------------


def greedy_rate(logits_of: Callable[[torch.Tensor, bool], torch.Tensor], prompt: torch.Tensor,
                new_tokens: int) -> tuple[float, list[int], torch.Tensor]:
    """Greedy decoding by hand: steps/s over `new_tokens` single-token steps (after the prompt's), the
    tokens, and the prompt's last logits. `logits_of(ids, first)` runs a step; `first` starts a sequence."""
    logits = logits_of(prompt, True)[:, -1]
    first_logits, tokens = logits.float().cpu(), []
    began = 0.0
    for i in range(WARMUP + new_tokens):
        if i == WARMUP:
            began = time.perf_counter()
        token = logits.argmax(-1, keepdim=True)
        tokens.append(int(token))  # waits for the step, as a generating client must
        logits = logits_of(token, False)[:, -1]
    int(logits.argmax())
    return new_tokens / (time.perf_counter() - began), tokens, first_logits


def swarm_section(model: PreTrainedModel, shapes: Shapes, device: torch.device, found: dict) -> list[Row]:
    """A Llama-2-7B-shaped model served by two server processes (bf16, then nf4), a client generating
    through them, beside the same model generating in this process with transformers (bf16, and nf4 through
    transformers' own bitsandbytes integration). Logits are checked against an fp32 reference: the swarm's
    error may be at most twice transformers' own in the same dtype."""
    if importlib.util.find_spec("hivemind") is None:
        return [Row("swarm", "two servers vs in-process", None, note="skipped: hivemind is not installed")]
    from swarmtune.client.model import SwarmForCausalLM
    from swarmtune.local_swarm import LocalSwarm

    s = shapes.swarm
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(llama_config(s, s.vocab), dtype=torch.bfloat16)
    prompt = torch.randint(3, s.vocab, (1, s.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    new_tokens, half = s.new_tokens, s.blocks // 2
    max_length = s.prompt + WARMUP + new_tokens + 2
    quants = ["none"] + (["nf4"] if importlib.util.find_spec("bitsandbytes") is not None else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="swarmtune-gpu-swarm-") as tmp, torch.inference_mode():
        path, logs = os.path.join(tmp, "model"), os.path.join(tmp, "logs")
        os.makedirs(logs)
        hf.eval().requires_grad_(False).save_pretrained(path, max_shard_size="2GB")
        local = {"none": local_greedy(hf, prompt, new_tokens)}
        reference = hf.float()(prompt).logits[:, -1].float().cpu()  # fp32 upcast of the same weights
        del hf
        free_memory(device)
        if "nf4" in quants:
            local["nf4"] = local_nf4(path, prompt, new_tokens, device)
        for quant in quants:
            options = dict(dtype="bf16", device=str(device), cache_mb=s.cache_mb, quant=quant, throughput=1.0)
            with LocalSwarm(path, spans=[(0, half), (half, s.blocks)], log_dir=logs,
                            start_timeout=shapes.start_timeout, **options) as swarm:
                client = SwarmForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, dtype="bf16",
                                                          dht_prefix=swarm.dht_prefix).to(device)
                try:
                    with client.inference_session(max_length) as session:
                        def swarm_step(ids: torch.Tensor, first: bool, parts=client.parts, session=session):
                            return parts.logits(session.step(parts.embed_tokens(ids)))

                        rate, tokens, logits = greedy_rate(swarm_step, prompt, new_tokens)
                    k = min(8, len(tokens))
                    generated = client.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False)
                    generate_ok = generated[0, s.prompt:].tolist() == tokens[:k]
                finally:
                    client.close()
            rows += swarm_rows(quant, s, rate, tokens, logits, local, reference, generate_ok)
    return rows


def local_greedy(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int):
    """transformers' own model generating greedily in this process (DynamicCache)."""
    cache = DynamicCache()
    return greedy_rate(lambda ids, first: model(input_ids=ids, use_cache=True, **{CACHE_KWARG: cache}).logits,
                       prompt, new_tokens)


def local_nf4(path: str, prompt: torch.Tensor, new_tokens: int, device: torch.device):
    """The checkpoint loaded in nf4 by transformers' bitsandbytes integration, generating; None if it cannot."""
    from transformers import BitsAndBytesConfig

    try:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.bfloat16,
                                                     device_map=str(device), attn_implementation="sdpa").eval()
    except Exception as e:  # e.g. no 4-bit loading on this device: the nf4 rows say so
        print(f"transformers could not load the model in nf4: {type(e).__name__}: {e}", flush=True)
        return None
    result = local_greedy(model, prompt, new_tokens)
    del model
    free_memory(device)
    return result


def swarm_rows(quant: str, s: SwarmShapes, rate: float, tokens: list[int], logits: torch.Tensor, local: dict,
               reference: torch.Tensor, generate_ok: bool) -> list[Row]:
    name = "bf16" if quant == "none" else quant
    setup = (f"{s.blocks} blocks of hidden {s.hidden} in two servers ({s.blocks // 2} each, KV budget "
             f"{s.cache_mb} MiB), batch 1, prompt {s.prompt}, {s.new_tokens} steps timed")
    bf16_rate, _, bf16_logits = local["none"]
    baseline = local.get(quant)
    if baseline is None:
        return [Row("swarm", f"steps/s, {name} swarm of two server processes", rate, "steps/s", bf16_rate,
                    "transformers in-process, bf16", note=f"{setup}; transformers could not load {name}")]
    hf_rate, hf_tokens, hf_logits = baseline
    same = next((i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b), len(tokens))
    error, hf_error = relative_error(logits, reference), relative_error(hf_logits, reference)
    rows = [
        Row("swarm", f"steps/s, {name} swarm of two server processes, client generating", rate, "steps/s", hf_rate,
            f"transformers in-process, {name}", f">= {E2E_TARGET_RATIO:g} x baseline",
            rate >= E2E_TARGET_RATIO * hf_rate,
            note=f"{setup}; greedy tokens equal to transformers' for the first {same} of {len(tokens)}"
                 + ("" if quant == "none" else f"; transformers bf16: {bf16_rate:.3g} steps/s")),
        Row("swarm", f"prompt logits vs fp32 reference, {name} swarm", error, "rel. error", hf_error,
            f"transformers {name}", "<= 2 x baseline", error <= 2 * hf_error + 1e-6, check=True),
    ]
    if quant == "none":
        rows.append(Row("swarm", "generate() over the swarm equals the hand-written greedy loop", float(generate_ok),
                        ok=generate_ok, check=True))
    return rows


# ---- local offloading ---------------------------------------------------------------------------


class _LayerCache:
    """Layer `index` of a span's cache, for the one device block that runs every block in turn."""

    def __init__(self, cache: SpanKVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.cache.update(key, value, self.cache.start + self.index)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.length


class Offloaded:
    """The paper's other baseline: every block in host memory (pinned on CUDA), copied into one device
    block right before it runs, at every step. Only the KV cache stays on the device."""

    def __init__(self, span: SpanModel):
        pin = next(span.parameters()).device.type == "cuda"
        self.span = span
        self.host = [[_pinned_copy(p, pin) for p in block.parameters()] for block in span.blocks]
        self.slot = copy.deepcopy(span.blocks[0])

    def __call__(self, hidden: torch.Tensor, cache: SpanKVCache) -> torch.Tensor:
        span, new = self.span, hidden.shape[1]
        mask = torch.ones(hidden.shape[0], cache.length + new, dtype=torch.long, device=hidden.device)
        positions = torch.arange(cache.length, cache.length + new, device=hidden.device)[None]
        for i, kwargs in enumerate(span.family.layer_inputs(span, hidden, mask, positions, cache)):
            for dst, src in zip(self.slot.parameters(), self.host[i]):
                dst.copy_(src, non_blocking=True)
            hidden = span.family.run_block(self.slot, hidden, {**kwargs, "cache": _LayerCache(cache, i)})
        cache.advance(new)
        return hidden


def _pinned_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
    return out.copy_(t)


def offload_section(model: PreTrainedModel, shapes: Shapes, device: torch.device, found: dict) -> list[Row]:
    span = span_of(model)
    prompt = torch.randn(1, shapes.context, shapes.hidden, dtype=model.dtype, device=device)
    token = torch.randn(1, 1, shapes.hidden, dtype=model.dtype, device=device)
    calls = 1 + shapes.offload_steps
    offloaded = Offloaded(span)
    with torch.inference_mode():
        cache = prefilled(span, prompt, calls)
        resident_first, resident_times = timed_calls(lambda: span(token, cache=cache), calls, device)
        offload_cache = span.make_cache(1, shapes.context + calls)
        offloaded(prompt, offload_cache)
        offload_first, offload_times = timed_calls(lambda: offloaded(token, offload_cache), calls, device)
    rate = 1 / statistics.median(offload_times[1:])
    resident = 1 / statistics.median(resident_times[1:])
    swarm = found.get("swarm_steps_s")
    baseline, name = (swarm, "swarm (server process)") if swarm else (resident, "blocks resident on the device")
    nbytes = sum(t.nbytes for ts in offloaded.host for t in ts)
    note = (f"baseline / offloading = {baseline / rate:.1f}x; {nbytes * rate / 1e9:.1f} GB/s host-to-device; "
            f"resident in-process: {resident:.1f} steps/s")
    return [Row("offload", "steps/s, local offloading (pinned host memory, block by block)", rate, "steps/s",
                baseline, name, note=note),
            check_row("offload", "step output, offloading vs resident", offload_first, resident_first, model.dtype)]


# ---- report -------------------------------------------------------------------------------------


def short(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def verdict(row: Row, enforce: bool) -> str:
    if row.value is None:
        return "FAILED" if row.ok is False else "skipped"
    if row.ok is None:
        return ""
    if row.check:
        return "ok" if row.ok else "FAILED"
    return ("met" if row.ok else "MISSED") + ("" if enforce else " (not enforced)")


def table(rows: list[Row], enforce: bool) -> str:
    headers = ["section", "figure", "ours", "baseline (same run)", "ours/baseline", "target", "verdict", "note"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        ratio = r.value / r.baseline if r.value is not None and r.baseline else None
        baseline = f"{short(r.baseline)} ({r.baseline_name})" if r.baseline is not None else "-"
        cells = [r.section, r.name, f"{short(r.value)} {r.unit}".strip(), baseline, short(ratio), r.target,
                 verdict(r, enforce), r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}


def run_guarded(name: str, fn: Callable[[], list[Row]], rows: list[Row]) -> None:
    """Run one section; an exception becomes a failed row, and the other sections still run."""
    began, before = time.perf_counter(), len(rows)
    try:
        rows += fn()
    except Exception as e:
        traceback.print_exc()
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        rows.append(Row(name, f"{name} section", None, ok=False, check=True,
                        note=f"error: {type(e).__name__}: {first_line}"))
    print(f"[{name}] {time.perf_counter() - began:.1f} s", flush=True)
    print(table(rows[before:], enforce=False), flush=True)  # a run cut short still reports what it measured


def parse_flags(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU tests); speed targets not enforced")
    p.add_argument("--no-enforce", action="store_true", help="report speed targets without failing on them")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--json", default=None, help="also write the rows and the environment to this file")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}: choose from {','.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_flags(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --small --device cpu --no-enforce to test on a CPU")
    shapes, enforce = (SMALL if args.small else FULL), not (args.small or args.no_enforce)
    env = environment(device)
    print(f"{env} shapes={shapes} enforce={enforce}", flush=True)
    torch.manual_seed(0)
    cuda.configure(device)  # what servers do; the decode section also times transformers under torch's defaults
    began = time.perf_counter()
    model = build_model(shapes, torch.bfloat16, device)
    print(f"[model] {time.perf_counter() - began:.1f} s", flush=True)
    sections = {"decode": decode_section, "quant": quant_section, "train": train_section, "e2e": e2e_section,
                "offload": offload_section, "swarm": swarm_section}
    rows: list[Row] = []
    found: dict = {}
    with shutdown.stopped_by_signals():  # SIGTERM, as Ctrl-C, stops the swarm section's servers before we go
        for name in args.sections.split(","):
            run_guarded(name, lambda fn=sections[name]: fn(model, shapes, device, found), rows)
            free_memory(device)
    print(table(rows, enforce), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "shapes": asdict(shapes), "enforce": enforce,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    failed = [r for r in rows if r.ok is False and (r.check or enforce)]
    for r in failed:
        print(f"FAILED: {r.section}: {r.name}: {short(r.value)} {r.unit} (target {r.target}) {r.note}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
