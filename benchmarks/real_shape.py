"""Real block shapes on a CPU: a Llama-2-70B-shaped checkpoint served by server processes on 127.0.0.1.

Everything else in the suite uses hidden sizes of 64-1024; real servers move hidden-8192
activations and hold 1.7 GB blocks. This builds a random-weight checkpoint of 4 such blocks in
bf16 safetensors, sharded as the hub shards it (an index and shards that blocks straddle), and
checks, beside plain transformers on the same blocks in this process:

- per-block loading opens only the shards that hold the block's tensors;
- two server processes (2 blocks each): a forward, the gradient w.r.t. the inputs, and 16 decode
  steps equal transformers' within bf16 tolerance;
- each server's RSS stays within 1.15x its blocks' bytes plus its KV budget and the Python runtime
  (what importing the server costs, ~0.4 GiB, measured in the same run): no second copy of the weights;
- an 8 x 512 x 8192 activation (64 MiB in bf16) streams through the chain and back.

It reports RSS, load time, and decode and forward time per block against transformers. About 14
GiB of memory and 5-10 minutes on 2 cores; `tests/test_real_shape.py` (slow) runs it with one
block and one server. Exits 1 when a check fails.

`--family qwen3_moe` does the same with Qwen3-30B-A3B's MoE blocks as published (hidden 2048, 32
query and 4 KV heads of 128, 128 routed experts of 768, 8 per token; 1.2 GB each in bf16), 2
blocks in 2 servers by default: the experts' checkpoint layout (one tensor per expert, fused by
the server as it loads) and the routing through a real server, beside transformers.

    python -m benchmarks.real_shape [--family llama|qwen3_moe] [--blocks 4] [--servers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from unittest import mock

import psutil
import torch
from transformers import AutoModelForCausalLM, DynamicCache, PretrainedConfig, PreTrainedModel, Qwen3MoeConfig

from benchmarks.gpu_server import CACHE_KWARG, TOLERANCE, VOCAB, Row, check_row, llama_config, table
from swarmtune import shutdown
from swarmtune.client.config import ClientConfig
from swarmtune.client.connection import SwarmConnection
from swarmtune.client.inference import InferenceSession
from swarmtune.client.sequential import RemoteSequential
from swarmtune.local_swarm import LocalSwarm
from swarmtune.models import checkpoint
from swarmtune.models.checkpoint import INDEX_FILE

GiB = 1 << 30
RSS_FACTOR = 1.15


@dataclass(frozen=True)
class Shapes:
    """Block shape fields as benchmarks.gpu_server.Shapes names them (its llama_config reads them)."""

    family: str = "llama"
    hidden: int = 8192
    heads: int = 64
    kv_heads: int = 8
    mlp: int = 28672
    blocks: int = 4
    servers: int = 2
    shard_mb: int = 1000          # shards smaller than a block (1.7 GB; qwen3_moe 1.2 GB), so that blocks straddle them
    tokens: int = 32              # forward and backward checks: [1, tokens]
    prompt: int = 16
    decode_steps: int = 16
    activation: tuple[int, int] = (8, 512)  # the large activation streamed through and back
    cache_mb: int = 64            # each server's KV budget
    start_timeout: float = 600.0
    experts: int = 0              # qwen3_moe: routed experts, each with an MLP of `expert_mlp`, `per_token` used
    expert_mlp: int = 0
    per_token: int = 0


# Qwen3-30B-A3B's blocks as published (config.json): every block MoE, no shared expert
QWEN3_MOE = dict(family="qwen3_moe", hidden=2048, heads=32, kv_heads=4, mlp=6144, experts=128, expert_mlp=768,
                 per_token=8, blocks=2, servers=2)


def model_config(s: Shapes) -> PretrainedConfig:
    if s.family == "llama":
        return llama_config(s)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=s.hidden, intermediate_size=s.mlp, num_hidden_layers=s.blocks,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=128, num_experts=s.experts,
        moe_intermediate_size=s.expert_mlp, num_experts_per_tok=s.per_token, norm_topk_prob=True,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return config


def spans(s: Shapes) -> list[tuple[int, int]]:
    per = -(-s.blocks // s.servers)
    return [(i, min(i + per, s.blocks)) for i in range(0, s.blocks, per)]


def block_bytes(model: PreTrainedModel, start: int, end: int) -> int:
    return sum(p.nbytes for block in model.model.layers[start:end] for p in block.parameters())


def shards_read(path: str, block: int) -> tuple[set[str], set[str]]:
    """(the shards opened while loading `block`, the shards the index lists for its tensors)."""
    with open(os.path.join(path, INDEX_FILE)) as f:
        weight_map = json.load(f)["weight_map"]
    expected = {shard for key, shard in weight_map.items() if key.startswith(f"model.layers.{block}.")}
    opened: set[str] = set()
    real_open = checkpoint.safe_open

    def recording(filename, *args, **kwargs):
        opened.add(os.path.basename(filename))
        return real_open(filename, *args, **kwargs)

    checkpoint.open_checkpoint.cache_clear()
    with mock.patch.object(checkpoint, "safe_open", recording):
        checkpoint.load_span(path, block, block + 1, dtype=torch.bfloat16)
    return opened, expected


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    began = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - began


def run(s: Shapes) -> list[Row]:
    torch.manual_seed(0)
    rows: list[Row] = []
    dtype = torch.bfloat16
    model, build_s = timed(lambda: AutoModelForCausalLM.from_config(model_config(s), dtype=dtype))
    model.eval().requires_grad_(False)
    with tempfile.TemporaryDirectory(prefix="swarmtune-real-shape-") as tmp:
        path, logs = os.path.join(tmp, "model"), os.path.join(tmp, "logs")
        os.makedirs(logs)
        _, save_s = timed(lambda: model.save_pretrained(path, max_shard_size=f"{s.shard_mb}MB"))
        shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        rows.append(Row("load", "checkpoint written", save_s, "s", note=f"{len(shards)} shards of <= {s.shard_mb} MB "
                        f"+ {INDEX_FILE}; {block_bytes(model, 0, s.blocks) / GiB:.2f} GiB of blocks"))
        for block in range(s.blocks):
            opened, expected = shards_read(path, block)
            rows.append(Row("load", f"block {block} opens only its shards", float(opened == expected),
                            ok=opened == expected, check=True,
                            note=f"opened {sorted(opened)}, index: {sorted(expected)}"))
        with LocalSwarm(path, spans=[], log_dir=logs, start_timeout=s.start_timeout) as swarm:
            load_times = []
            for span in spans(s):
                _, seconds = timed(lambda span=span: swarm.add_server(  # as many threads as transformers here
                    span, dtype="bf16", device="cpu", cache_mb=s.cache_mb, throughput=1.0,
                    num_threads=torch.get_num_threads()))
                load_times.append(seconds)
            runtime = runtime_rss()
            rows += rss_rows(model, swarm, s, load_times, runtime)
            connection = SwarmConnection(ClientConfig(initial_peers=swarm.initial_peers), swarm.dht_prefix, s.blocks)
            try:
                rows += forward_backward_rows(model, connection, s)
                rows += decode_rows(model, connection, s)
                rows += activation_rows(connection, s)
                rows += rss_rows(model, swarm, s, None, runtime)  # after the traffic: still no second copy
            finally:
                connection.close()
    return rows


def runtime_rss() -> int:
    """RSS of a process that has imported what a server imports, before it loads anything (~0.4 GiB)."""
    code = "import psutil, swarmtune.server.server; print(psutil.Process().memory_info().rss)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


def rss_rows(model: PreTrainedModel, swarm: LocalSwarm, s: Shapes, load_times: list[float] | None,
             runtime: int) -> list[Row]:
    """Each server's RSS against its blocks' bytes (x1.15), its KV budget and the Python runtime: a second
    copy of the weights would add 100%."""
    rows = []
    for i, (server, (start, end)) in enumerate(zip(swarm.servers, spans(s))):
        rss = psutil.Process(server.pid).memory_info().rss
        weights = block_bytes(model, start, end)
        bound = runtime + RSS_FACTOR * weights + s.cache_mb * (1 << 20)
        when = "after loading" if load_times is not None else "after the traffic"
        note = (f"blocks {start}:{end}: {weights / GiB:.2f} GiB of weights, KV budget {s.cache_mb} MiB, "
                f"runtime (imports alone) {runtime / GiB:.2f} GiB")
        if load_times is not None:
            note += f"; started and loaded in {load_times[i]:.1f} s"
        rows.append(Row("memory", f"server {i} RSS {when}", rss / GiB, "GiB", bound / GiB,
                        f"runtime + {RSS_FACTOR}x its blocks + KV budget", "<= baseline", rss <= bound, check=True,
                        note=note))
    return rows


def forward_backward_rows(model: PreTrainedModel, connection: SwarmConnection, s: Shapes) -> list[Row]:
    """A forward and the gradient w.r.t. its inputs through the swarm, against transformers' autograd."""
    remote = RemoteSequential(connection)
    hidden = torch.randn(1, s.tokens, s.hidden, dtype=torch.bfloat16)
    probe = torch.randn(1, s.tokens, s.hidden, dtype=torch.bfloat16)
    norm = model.model.norm

    def through(fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        x = hidden.clone().requires_grad_(True)
        began = time.perf_counter()
        out = fn(x)
        forward_s = time.perf_counter() - began
        (out.float() * probe.float()).sum().backward()
        return out.detach(), x.grad, forward_s, time.perf_counter() - began - forward_s

    ours, ours_grad, ours_fwd, ours_bwd = through(lambda x: norm(remote(x)))
    with torch.enable_grad():
        hf, hf_grad, hf_fwd, hf_bwd = through(lambda x: model.model(inputs_embeds=x).last_hidden_state)
    per_block = 1e3 / s.blocks
    return [
        check_row("forward", f"forward [1, {s.tokens}], swarm vs transformers", ours, hf, torch.bfloat16),
        check_row("backward", "gradient w.r.t. the inputs, swarm vs transformers", ours_grad, hf_grad, torch.bfloat16),
        Row("forward", f"forward [1, {s.tokens}] per block, swarm", ours_fwd * per_block, "ms", hf_fwd * per_block,
            "transformers in-process"),
        Row("backward", f"backward [1, {s.tokens}] per block, swarm", ours_bwd * per_block, "ms", hf_bwd * per_block,
            "transformers in-process", note="the swarm's backward recomputes the forward unless its graph was kept"),
    ]


def decode_rows(model: PreTrainedModel, connection: SwarmConnection, s: Shapes) -> list[Row]:
    """`decode_steps` single-token steps after a prompt, each step's output against transformers' DynamicCache."""
    torch.manual_seed(1)
    prompt = torch.randn(1, s.prompt, s.hidden, dtype=torch.bfloat16)
    tokens = [torch.randn(1, 1, s.hidden, dtype=torch.bfloat16) for _ in range(s.decode_steps)]
    cache = DynamicCache()

    def hf_step(x: torch.Tensor) -> torch.Tensor:
        return model.model(inputs_embeds=x, use_cache=True, **{CACHE_KWARG: cache}).last_hidden_state

    worst, ours_s, hf_s = 0.0, [], []
    with torch.inference_mode(), InferenceSession(connection, s.prompt + s.decode_steps, 1) as session:
        ours, hf = model.model.norm(session.step(prompt)), hf_step(prompt)
        worst = max(worst, check_row("decode", "", ours, hf, torch.bfloat16).value)
        for token in tokens:
            ours, seconds = timed(lambda token=token: session.step(token))
            ours_s.append(seconds)
            hf, seconds = timed(lambda token=token: hf_step(token))
            hf_s.append(seconds)
            worst = max(worst, check_row("decode", "", model.model.norm(ours), hf, torch.bfloat16).value)
    tol = TOLERANCE[torch.bfloat16]
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return [
        Row("decode", f"prompt and {s.decode_steps} decode steps, worst step vs transformers", worst, "rel. error",
            target=f"<= {tol:g}", ok=worst <= tol, check=True),
        Row("decode", "decode step per block, swarm (InferenceSession)", 1e3 * median(ours_s) / s.blocks, "ms",
            1e3 * median(hf_s) / s.blocks, "transformers in-process (DynamicCache)",
            note="memory-bound: every step reads all weights once" if s.family == "llama" else
            f"reads the attention and the {s.per_token} experts each token chose, of {s.experts}"),
    ]


def activation_rows(connection: SwarmConnection, s: Shapes) -> list[Row]:
    """The large activation through every server and back (split into frames on the way)."""
    remote = RemoteSequential(connection)
    batch, length = s.activation
    hidden = torch.randn(batch, length, s.hidden, dtype=torch.bfloat16)
    with torch.no_grad():
        out, seconds = timed(lambda: remote(hidden))
    ok = out.shape == hidden.shape and bool(torch.isfinite(out).all())
    mib = hidden.nbytes / (1 << 20)
    return [Row("stream", f"{batch} x {length} x {s.hidden} activation through the chain and back", seconds, "s",
                ok=ok, check=True, note=f"{mib:.0f} MiB each way per server; shape and finiteness checked")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("llama", "qwen3_moe"), default="llama")
    p.add_argument("--blocks", type=int, default=None, help="default: 4 (llama), 2 (qwen3_moe)")
    p.add_argument("--servers", type=int, default=None, help="default: 2")
    p.add_argument("--activation", type=int, nargs=2, default=Shapes.activation, metavar=("BATCH", "LENGTH"))
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    base = Shapes(**QWEN3_MOE) if args.family == "qwen3_moe" else Shapes()
    shapes = replace(base, blocks=args.blocks or base.blocks, servers=args.servers or base.servers,
                     activation=tuple(args.activation))
    with shutdown.stopped_by_signals():  # SIGTERM, as Ctrl-C, stops the servers (their own sessions) before we go
        rows = run(shapes)
    print(table(rows, enforce=True), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shapes": asdict(shapes), "rows": [asdict(r) for r in rows]}, f, indent=1)
    failed = [r for r in rows if r.ok is False]
    for r in failed:
        print(f"FAILED: {r.section}: {r.name}: {r.value} {r.unit} {r.note}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
