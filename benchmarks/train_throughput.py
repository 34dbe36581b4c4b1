"""LoRA training throughput through a 3-server loopback swarm vs the same model local with PEFT.

Both run the same steps (forward, backward, AdamW step) on the same batches in this one run, with
one torch thread each (as every LocalSwarm server has), so the ratio shows what the swarm path
costs: serialisation, p2p round trips and recomputation of the forward in backward. It also
reports the LoRA bytes a step sends, with the digest reuse (backward names the forward's
adapter by digest) and without it (every request carries the tensors).

    python benchmarks/train_throughput.py --hidden 256 --layers 6 --batch 4 --seq 128
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from swarmtune.client.model import SwarmForCausalLM
from swarmtune.client.span_requests import LoraShipments
from swarmtune.swarm import LocalSwarm
from swarmtune.tiny_model import make_tiny_model
from swarmtune.tuning.module import LoraSettings, OptimConfig, SwarmLM, TuningConfig


class _Forgetful(LoraShipments):
    """A digest memory that never remembers: every request carries the adapter tensors."""

    def record(self, peer: str, digest: str) -> None:
        pass


def timed_steps(step, batches: list[torch.Tensor], warmup: int) -> float:
    """Tokens per second over the batches after `warmup` untimed ones."""
    for ids in batches[:warmup]:
        step(ids)
    start = time.perf_counter()
    for ids in batches[warmup:]:
        step(ids)
    return sum(ids.numel() for ids in batches[warmup:]) / (time.perf_counter() - start)


def train_step(model, optimizer):
    def step(ids: torch.Tensor) -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the best of each is reported")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model("llama", os.path.join(tmp, "model"), layers=args.layers, hidden=args.hidden)
        third = args.layers // 3
        spans = [(0, third), (third, 2 * third), (2 * third, args.layers)]
        batches = [torch.randint(3, 300, (args.batch, args.seq)) for _ in range(args.warmup + args.steps)]
        lora = LoraSettings(rank=args.rank, alpha=2 * args.rank)
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        local = get_peft_model(local, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets))
        local_params = [p for p in local.parameters() if p.requires_grad]
        local_step = train_step(local, torch.optim.AdamW(local_params, lr=1e-4))

        with LocalSwarm(path, spans=spans, log_dir=tmp) as swarm:
            model = SwarmForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
            try:
                module = SwarmLM(model, TuningConfig(lora=lora), OptimConfig())
                swarm_step = train_step(module, torch.optim.AdamW(module.lora.parameters(), lr=1e-4))
                replayer = model.remote.replayer
                remembering = model.connection.lora_shipments
                stats = replayer.stats
                runs = {"local": [], True: [], False: []}
                bytes_per_step = {}
                for _ in range(args.rounds):  # interleaved, so load from other processes hits all alike
                    runs["local"].append(timed_steps(local_step, batches, args.warmup))
                    for reuse in (True, False):
                        model.connection.lora_shipments = remembering if reuse else _Forgetful()
                        sent, lora_sent = stats.bytes_sent, stats.lora_bytes_sent
                        runs[reuse].append(timed_steps(swarm_step, batches, args.warmup))
                        n = len(batches)
                        bytes_per_step[reuse] = ((stats.bytes_sent - sent) / n, (stats.lora_bytes_sent - lora_sent) / n)
            finally:
                model.close()

    lora_bytes = sum(p.numel() * p.element_size() for p in module.lora.parameters())
    best = {k: max(v) for k, v in runs.items()}
    result = {
        "model": f"llama {args.layers} blocks x hidden {args.hidden}, spans {spans}",
        "batch": f"{args.batch} x {args.seq} tokens", "lora_rank": args.rank, "lora_bytes": lora_bytes,
        "local_peft_tokens_per_s": round(best["local"], 1),
        "swarm_tokens_per_s": round(best[True], 1),
        "swarm_vs_local": round(best[True] / best["local"], 3),
        "swarm_tokens_per_s_without_digest": round(best[False], 1),
        "bytes_per_step_with_digest": bytes_per_step[True][0],
        "bytes_per_step_without_digest": bytes_per_step[False][0],
        "lora_bytes_per_step_with_digest": bytes_per_step[True][1],
        "lora_bytes_per_step_without_digest": bytes_per_step[False][1],
        "all_runs_tokens_per_s": {str(k): [round(x, 1) for x in v] for k, v in runs.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
