"""Evaluation through the inference path: generation metrics in validation, the eval entry point, scoring."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from unittest import mock

import pytest
import torch
from hydra import compose
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoConfig, AutoTokenizer

from swarmtune import eval as eval_entry
from swarmtune.adapters.lora import ClientLora, target_shapes
from swarmtune.adapters.peft_format import save_adapter
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.tuning.data import IGNORE, DataConfig, EvalExample, InstructionDataModule
from swarmtune.tuning.evaluation import SAMPLE_COLUMNS, EvalConfig, exact_match, generate, log_samples, normalize, score
from tests.helpers import PEERS, RECIPES, adapter_path, hydra_context, reference_model
from tests.test_dpo import peft_margins


def peer_list(swarm) -> str:
    return "[" + ",".join(f"'{p}'" for p in swarm.initial_peers) + "]"


def test_exact_match_normalises_case_punctuation_articles_and_spaces():
    assert normalize("  The sky is\nBLUE. ") == "sky is blue"
    assert exact_match("Eleven", "eleven.") and exact_match("the sky is  blue", "The sky is blue.")
    assert exact_match("an apple!", "Apple")
    assert not exact_match("eleven", "twelve.") and not exact_match("", "eleven.")
    assert not exact_match("theme", "me")  # articles are whole words only
    prompts = [EvalExample("Q1", [1], "eleven."), EvalExample("Q2", [1], "The sky is blue."),
               EvalExample("Q3", [1], "four.")]
    assert score(prompts, ["Eleven", "sky is blue", "five"]) == {"exact_match": 2 / 3}
    assert score([], []) == {}


def test_samples_go_to_a_wandb_table_and_nowhere_else():
    rows = [{"prompt": "Q", "reference": "a.", "generation": "a", "exact_match": True}]
    wandb = mock.create_autospec(WandbLogger, instance=True)
    log_samples(wandb, rows, step=7)
    wandb.log_table.assert_called_once_with(key="val/samples", columns=SAMPLE_COLUMNS, data=[["Q", "a.", "a", True]],
                                            step=7)
    log_samples(None, rows, step=7)  # csv, tensorboard, none: scalars only


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_for_eval(recipe, monkeypatch):
    """Training samples a few prompts per validation; the eval entry point takes the whole split."""
    monkeypatch.setenv("SWARMTUNE_INITIAL_PEERS", ",".join(PEERS))
    with hydra_context():
        train_cfg = compose("config", overrides=[f"recipe={recipe}"])
    with hydra_context(eval_entry.GROUPS):
        eval_cfg = compose("eval", overrides=[f"recipe={recipe}", "adapter=/runs/x/adapter"])
    train_eval = EvalConfig(**OmegaConf.to_container(train_cfg.eval))
    assert train_cfg.generate_every_n_val >= 1 and train_eval.num_samples and "adapter" not in train_cfg
    assert EvalConfig(**OmegaConf.to_container(eval_cfg.eval)).num_samples is None
    assert eval_cfg.adapter == "/runs/x/adapter" and eval_cfg.split == "validation"
    assert eval_cfg.model == train_cfg.model and eval_cfg.data == train_cfg.data
    assert eval_cfg.swarm == train_cfg.swarm and eval_cfg.seed == train_cfg.seed
    # nothing that evaluation would not read: no training groups, no training-only values
    assert set(eval_cfg) == {"model", "swarm", "data", "adapter", "split", "seed", "output_dir", "eval", "beta"}
    assert eval_cfg.beta == train_cfg.tuning.beta


@pytest.mark.slow  # a training run of its own (tiny_local_run validates and generates too)
def test_validation_generates_through_the_swarm_and_logs(tmp_path, tiny_llama, llama_swarm, train_process):
    """tiny_local with a validation after every step and generation in every second one."""
    run_dir = tmp_path / "run"
    args = ["recipe=tiny_local", f"model.path={tiny_llama}", f"swarm.initial_peers={peer_list(llama_swarm)}",
            "trainer.max_steps=4", "trainer.val_check_interval=1", "generate_every_n_val=2", "eval.num_samples=3",
            "eval.max_new_tokens=6", "logger=csv", f"hydra.run.dir={run_dir}"]
    output = train_process(args, tmp_path / "train.log").wait(timeout=240)
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    ppl = {int(r["step"]): float(r["val/ppl"]) for r in rows if r.get("val/ppl")}
    matched = {int(r["step"]): float(r["val/exact_match"]) for r in rows if r.get("val/exact_match")}
    assert len(ppl) == 4 and all(math.isfinite(v) and v > 1 for v in ppl.values()), ppl
    assert len(matched) == 2 and set(matched) < set(ppl) and all(0 <= v <= 1 for v in matched.values()), matched

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {s["step"] for s in samples} == {2, 4}  # after optimizer steps 2 and 4
    assert all(set(s) == {"step", *SAMPLE_COLUMNS} for s in samples)
    assert all(s["prompt"].startswith("Question: ") and s["reference"] for s in samples)
    # The last validation saw the adapter as exported: its perplexity is plain PEFT's on the validation set,
    # and the same prompts decode to the same text now.
    adapter = adapter_path(output)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    nll, tokens = response_nll_locally(PeftModel.from_pretrained(reference_model(tiny_llama), adapter),
                                       composed_data(tiny_llama, tokenizer).eval_dataloader("validation"))
    assert math.isclose(ppl[max(ppl)], math.exp(nll / tokens), rel_tol=1e-4), (ppl, math.exp(nll / tokens))
    last = [s for s in samples if s["step"] == 4]
    model = SwarmForCausalLM.from_pretrained(tiny_llama, initial_peers=llama_swarm.initial_peers, adapter=adapter)
    try:
        prompts = [EvalExample(s["prompt"], [tokenizer.bos_token_id] + tokenizer.encode(s["prompt"],
                              add_special_tokens=False), s["reference"]) for s in last]
        assert generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=8) == [s["generation"] for s in last]
    finally:
        model.close()


def random_adapter(path, model_path: str) -> str:
    """A LoRA adapter with random A and B (B is zero at init, which would hide a missing adapter)."""
    config = AutoConfig.from_pretrained(model_path)
    lora = ClientLora(target_shapes(config, None), rank=4, alpha=8.0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return save_adapter(str(path), config, model_path, lora=lora)


def composed_data(model_path: str, tokenizer) -> InstructionDataModule:
    """The data module of the default recipe, as the entry points compose it."""
    with hydra_context(eval_entry.GROUPS):
        cfg = compose("eval", overrides=[f"model.path={model_path}"])
    return InstructionDataModule(DataConfig(**OmegaConf.to_container(cfg.data)), tokenizer)


def response_nll_locally(model, loader) -> tuple[float, int]:
    """Summed NLL over response tokens from transformers' own (mean) loss, times each batch's token count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += float(model(**batch).loss) * n
            count += n
    return total, count


def test_eval_entry_point_matches_plain_peft_perplexity(tmp_path, tiny_llama, llama_swarm):
    adapter = random_adapter(tmp_path / "adapter", tiny_llama)
    run_dir = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "swarmtune.eval", f"model.path={tiny_llama}",
                           f"swarm.initial_peers={peer_list(llama_swarm)}", f"adapter={adapter}", "eval.num_samples=4",
                           "eval.max_new_tokens=6", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == json.loads((run_dir / "metrics.json").read_text())
    assert printed["split"] == "validation" and printed["adapter"] == adapter and printed["samples"] == 4
    assert 0 <= printed["exact_match"] <= 1 and len((run_dir / "samples.jsonl").read_text().splitlines()) == 4

    loader = composed_data(tiny_llama, AutoTokenizer.from_pretrained(tiny_llama)).eval_dataloader("validation")
    nll, tokens = response_nll_locally(PeftModel.from_pretrained(reference_model(tiny_llama), adapter), loader)
    assert printed["tokens"] == tokens
    assert math.isclose(printed["ppl"], math.exp(nll / tokens), rel_tol=1e-4), (printed["ppl"], math.exp(nll / tokens))
    base_nll, _ = response_nll_locally(reference_model(tiny_llama), loader)
    assert abs(base_nll - nll) / tokens > 1e-2  # the adapter was applied


def test_eval_entry_point_on_preference_data_matches_plain_peft(tmp_path, tiny_llama, llama_swarm):
    """On preference pairs, the reward accuracy and margin of an adapter against the model without it."""
    adapter = random_adapter(tmp_path / "adapter", tiny_llama)
    run_dir = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "swarmtune.eval", "recipe=tiny_dpo", f"model.path={tiny_llama}",
                           f"swarm.initial_peers={peer_list(llama_swarm)}", f"adapter={adapter}", "beta=0.5",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == json.loads((run_dir / "metrics.json").read_text())

    with hydra_context(eval_entry.GROUPS):
        cfg = compose("eval", overrides=["recipe=tiny_dpo", f"model.path={tiny_llama}"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data = InstructionDataModule(DataConfig(**OmegaConf.to_container(cfg.data)), tokenizer)
    margins = peft_margins(tiny_llama, adapter, data, beta=0.5)
    assert printed["pairs"] == len(margins) > 0
    assert printed["reward_accuracy"] == sum(m > 0 for m in margins) / len(margins)
    assert math.isclose(printed["reward_margin"], sum(margins) / len(margins), rel_tol=1e-4, abs_tol=1e-5)
    assert {"loss", "rewards_chosen", "rewards_rejected"} <= set(printed) and abs(printed["reward_margin"]) > 1e-3
