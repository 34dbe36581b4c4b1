"""python -m swarmtune.eval [recipe=NAME] [adapter=DIR] [split=NAME] [key=value ...]: evaluate through a swarm.

Takes the model, swarm and data of the recipe (what training used), loads `adapter` (an exported
PEFT adapter; null: the base model) and measures on one split of the data:
  loss, ppl      mean NLL over the response tokens of every row, and its exp (forward passes)
  exact_match    greedy generations vs the reference responses, normalised (inference sessions)
On preference data (data.format=preference) it measures the adapter against the model without it:
  loss, reward_accuracy, reward_margin, rewards_chosen, rewards_rejected   DPO's, with `beta`, per pair
The metrics are printed as one JSON line and saved to ${output_dir}/metrics.json; the generations
go to ${output_dir}/samples.jsonl. With no swarm.initial_peers, the swarm of
`python -m swarmtune.swarm up` or an embedded LocalSwarm serves the model, as in training.
"""

from __future__ import annotations

import contextlib
import json
import os

import hydra
from omegaconf import DictConfig

from swarmtune.errors import UserError, check_source
from swarmtune.launch import (
    client_settings,
    config_path,
    open_model,
    open_tokenizer,
    register_recipes,
    reported,
    run_hydra_app,
    settings,
)

GROUPS = ("model", "swarm", "data")  # what evaluation takes of a recipe


def run(cfg: DictConfig) -> dict:
    """Evaluate as `cfg` says; returns the metrics, also written to ${output_dir}/metrics.json."""
    import torch

    from swarmtune.tuning.data import DataConfig, InstructionDataModule, load_checked, use_chat_template
    from swarmtune.tuning.evaluation import (
        EvalConfig,
        GenerationEval,
        perplexity,
        preference_scores,
        response_nll,
        write_samples,
    )

    data_config = settings(DataConfig, cfg.data, "data")
    if not cfg.beta > 0:
        raise UserError(f"beta must be a positive number, got {cfg.beta}")
    client_settings(cfg.swarm)  # the swarm's settings, the model's and adapter's paths before any data loads
    for source, what in ((cfg.model.path, "model.path"), (cfg.adapter, "adapter")):
        if source:
            check_source(source, what)
    raw = load_checked(data_config)
    eval_config = settings(EvalConfig, cfg.eval, "eval")
    tokenizer = use_chat_template(open_tokenizer(cfg.model), data_config, raw)
    torch.manual_seed(cfg.seed)
    output_dir = cfg.output_dir
    with contextlib.ExitStack() as stack:
        model, tokenizer = open_model(stack, cfg, os.path.join(output_dir, "swarm"), adapter=cfg.adapter,
                                      tokenizer=tokenizer)
        model.eval()
        data = InstructionDataModule(data_config, tokenizer, seed=cfg.seed, raw=raw)
        try:
            loader = data.eval_dataloader(cfg.split)
        except KeyError as e:
            raise UserError(f"split: {e.args[0]}") from None
        if data_config.format == "preference":
            metrics = {"split": cfg.split, "adapter": cfg.adapter, **preference_scores(model, loader, cfg.beta)}
            if not metrics["pairs"]:
                raise UserError(f"split {cfg.split!r} has no preference pairs to evaluate")
            return _save(metrics, output_dir)
        examples = data.eval_examples(cfg.split, eval_config.num_samples)
        nll, tokens = response_nll(model, loader)
        if not tokens:
            raise UserError(f"split {cfg.split!r} has no response tokens to evaluate")
        scores, samples = GenerationEval(examples, tokenizer, eval_config).run(model)

    metrics = {"split": cfg.split, "adapter": cfg.adapter, "tokens": tokens, "loss": nll / tokens,
               "ppl": perplexity(nll, tokens), "samples": len(samples), **scores}
    _save(metrics, output_dir)
    samples_file = os.path.join(output_dir, "samples.jsonl")
    if os.path.exists(samples_file):  # a rerun into the same directory replaces its samples
        os.remove(samples_file)
    write_samples(samples_file, samples)
    return metrics


def _save(metrics: dict, output_dir: str) -> dict:
    """Print `metrics` as one JSON line and write them to output_dir/metrics.json."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics), flush=True)
    return metrics


@hydra.main(config_path=config_path(), config_name="eval", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    with reported():
        run(cfg)


def main() -> None:
    register_recipes(GROUPS)
    run_hydra_app(_hydra_main, "eval")


if __name__ == "__main__":
    main()
