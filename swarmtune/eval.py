"""python -m swarmtune.eval [recipe=NAME] [adapter=DIR] [split=NAME] [key=value ...]: evaluate through a swarm.

Takes the training config of the recipe (model, swarm, data), loads `adapter` (an exported PEFT
adapter; null: the base model) and measures on one split of the data:
  loss, ppl      mean NLL over the response tokens of every row, and its exp (forward passes)
  exact_match    greedy generations vs the reference responses, normalised (inference sessions)
The metrics are printed as one JSON line and saved to ${output_dir}/metrics.json; the generations
go to ${output_dir}/samples.jsonl. With no swarm.initial_peers, an embedded LocalSwarm serves the
model, as in training.
"""

from __future__ import annotations

import contextlib
import json
import os

import hydra
from omegaconf import DictConfig, OmegaConf

from swarmtune.launch import config_path, open_model, register_recipes


def run(cfg: DictConfig) -> dict:
    """Evaluate as `cfg` says; returns the metrics, also written to ${output_dir}/metrics.json."""
    import torch

    from swarmtune.tuning.data import DataConfig, InstructionDataModule
    from swarmtune.tuning.evaluation import EvalConfig, GenerationEval, perplexity, response_nll, write_samples

    torch.manual_seed(cfg.seed)
    output_dir = cfg.output_dir
    with contextlib.ExitStack() as stack:
        model, tokenizer = open_model(stack, cfg, os.path.join(output_dir, "swarm"), adapter=cfg.adapter)
        model.eval()
        data = InstructionDataModule(DataConfig(**OmegaConf.to_container(cfg.data, resolve=True)), tokenizer)
        eval_config = EvalConfig(**OmegaConf.to_container(cfg.eval, resolve=True))

        nll, tokens = response_nll(model, data.eval_dataloader(cfg.split))
        if not tokens:
            raise ValueError(f"Split {cfg.split!r} has no response tokens to evaluate")
        generation = GenerationEval(data.eval_prompts(cfg.split, eval_config.num_samples), tokenizer, eval_config)
        scores, samples = generation.run(model)

    metrics = {"split": cfg.split, "adapter": cfg.adapter, "tokens": tokens, "loss": nll / tokens,
               "ppl": perplexity(nll, tokens), "samples": len(samples), **scores}
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    samples_file = os.path.join(output_dir, "samples.jsonl")
    if os.path.exists(samples_file):  # a rerun into the same directory replaces its samples
        os.remove(samples_file)
    write_samples(samples_file, samples)
    print(json.dumps(metrics), flush=True)
    return metrics


@hydra.main(config_path=config_path(), config_name="eval", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    register_recipes()
    _hydra_main()


if __name__ == "__main__":
    main()
