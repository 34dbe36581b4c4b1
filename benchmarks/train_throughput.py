"""LoRA training throughput through a 3-server loopback swarm vs the same model local with PEFT.

Both run the same steps (forward, backward, AdamW step) on the same batches in this one run, with
one torch thread each (as every LocalSwarm server has), so the ratio shows what the swarm path
costs: serialisation, p2p round trips and recomputation of the forward in backward. It also
reports the LoRA bytes a step sends, with the digest reuse (backward names the forward's
adapter by digest) and without it (every request carries the tensors).

With --dpo it compares instead a DPO step on `batch` preference pairs (the policy's forward and
backward over both answers, the reference's forward over both with the adapter off) with an SFT
step over the chosen answers of the same pairs, through the swarm and locally (PEFT, its adapter
disabled for the reference), and the swarm's DPO step with the reference's pass run before the
policy's rather than beside it. The target is a DPO step within 2.8x an SFT step.

    python benchmarks/train_throughput.py --hidden 256 --layers 6 --batch 4 --seq 128
    python benchmarks/train_throughput.py --dpo --hidden 256 --layers 6 --batch 4 --seq 128
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

from swarmtune import shutdown
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.client.span_requests import LoraShipments
from swarmtune.local_swarm import LocalSwarm
from swarmtune.tiny_model import make_tiny_model
from swarmtune.tuning import dpo
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


def preference_batches(n: int, pairs: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """Random pairs of `seq` tokens, the first half a shared prompt, the answers labelled: 2 * pairs rows each,
    the chosen answers first."""
    batches = []
    for _ in range(n):
        prompt = torch.randint(3, 300, (pairs, seq // 2))
        ids = torch.cat([prompt.repeat(2, 1), torch.randint(3, 300, (2 * pairs, seq - seq // 2))], dim=1)
        labels = ids.clone()
        labels[:, :seq // 2] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def seconds_per_step(step, batches: list[dict], warmup: int) -> float:
    for batch in batches[:warmup]:
        step(batch)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    return (time.perf_counter() - start) / len(batches[warmup:])


def objective_steps(model, optimizer, beta: float = 0.1, logps=None):
    """(sft step over the chosen rows, dpo step over all rows); `logps(batch)`: the policy's and the reference's
    log-probs, in turn (default: swarmtune's DPO step, the reference's pass beside the policy's)."""
    def finish(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def sft(batch: dict) -> None:
        chosen = {k: v[:v.shape[0] // 2] for k, v in batch.items()}
        finish(model(**chosen).loss)

    def dpo_step(batch: dict) -> None:
        finish(dpo.step(model, batch, beta)[0] if logps is None else dpo.loss(*logps(batch), beta)[0])

    return sft, dpo_step


def compare_objectives(args, path: str, spans: list[tuple[int, int]], tmp: str) -> dict:
    """Seconds per DPO step and per SFT step over the chosen answers, same pairs, swarm and local; and the swarm's
    DPO step with its reference's pass before the policy's instead of beside it."""
    batches = preference_batches(args.warmup + args.steps, args.batch, args.seq)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    local = get_peft_model(local, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets))

    def local_logps(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain PEFT, as TRL runs it: the reference with the adapter disabled, then the policy, all logits."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        with torch.no_grad(), local.disable_adapter():
            reference = dpo.sequence_logps(local(input_ids=ids, attention_mask=mask).logits, labels)
        return dpo.sequence_logps(local(input_ids=ids, attention_mask=mask).logits, labels), reference

    local_params = [p for p in local.parameters() if p.requires_grad]
    steps = {"local": objective_steps(local, torch.optim.AdamW(local_params, lr=1e-4), logps=local_logps)}
    runs = {(where, objective): [] for where in ("local", "swarm") for objective in ("sft", "dpo")}
    runs["swarm", "dpo_in_turn"] = []
    with LocalSwarm(path, spans=spans, log_dir=tmp) as swarm:
        model = SwarmForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        try:
            tuning = TuningConfig(lora=LoraSettings(rank=args.rank, alpha=2 * args.rank), objective="dpo")
            module = SwarmLM(model, tuning, OptimConfig())
            optimizer = torch.optim.AdamW(module.lora.parameters(), lr=1e-4)
            steps["swarm"] = objective_steps(model, optimizer)

            def in_turn(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
                reference = dpo.reference_logps(model, batch)
                return dpo.policy_logps(model, batch), reference

            in_turn_step = objective_steps(model, optimizer, logps=in_turn)[1]
            for _ in range(args.rounds):  # interleaved, so load from other processes hits all alike
                for where, (sft, dpo_step) in steps.items():
                    runs[where, "sft"].append(seconds_per_step(sft, batches, args.warmup))
                    runs[where, "dpo"].append(seconds_per_step(dpo_step, batches, args.warmup))
                runs["swarm", "dpo_in_turn"].append(seconds_per_step(in_turn_step, batches, args.warmup))
        finally:
            model.close()
    best = {k: min(v) for k, v in runs.items()}
    return {
        "model": f"llama {args.layers} blocks x hidden {args.hidden}, spans {spans}",
        "pairs": f"{args.batch} pairs x {args.seq} tokens (half prompt, half answer)", "lora_rank": args.rank,
        **{f"{where}_{objective}_step_s": round(best[where, objective], 4) for where, objective in best},
        "swarm_dpo_vs_sft": round(best["swarm", "dpo"] / best["swarm", "sft"], 3),
        "swarm_dpo_in_turn_vs_sft": round(best["swarm", "dpo_in_turn"] / best["swarm", "sft"], 3),
        "local_dpo_vs_sft": round(best["local", "dpo"] / best["local", "sft"], 3),
        "all_runs_s": {f"{w}_{o}": [round(x, 4) for x in v] for (w, o), v in runs.items()},
    }


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
    p.add_argument("--dpo", action="store_true", help="a DPO step vs an SFT step over the chosen answers instead")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model("llama", os.path.join(tmp, "model"), layers=args.layers, hidden=args.hidden)
        third = args.layers // 3
        spans = [(0, third), (third, 2 * third), (2 * third, args.layers)]
        if args.dpo:
            print(json.dumps(compare_objectives(args, path, spans, tmp), indent=2))
            return
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
    with shutdown.stopped_by_signals():  # SIGTERM, as Ctrl-C, stops the swarm's servers before we go
        main()
