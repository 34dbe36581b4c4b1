"""python -m swarmtune.train [recipe=NAME] [key=value ...]: fine-tune a swarm-served model with Lightning.

With no arguments it runs recipe `tiny_local`: a random tiny model served by an embedded
LocalSwarm on 127.0.0.1, trained on the bundled instruction set in a minute or two on a CPU.
With `swarm.initial_peers=[...]` it joins an existing swarm instead. Recipes live in the
top-level recipes/ folder and are registered as the Hydra config group `recipe`, so they are
found from any working directory, installed or not. At the end the adapter is exported in
PEFT format and its path printed.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from swarmtune.launch import config_path, open_model, register_recipes


def run(cfg: DictConfig) -> tuple[str, float]:
    """Train as `cfg` says; returns the adapter directory and the last validation loss (nan if none)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from swarmtune.tuning import loggers
    from swarmtune.tuning.checkpoint_io import AtomicCheckpointIO
    from swarmtune.tuning.data import DataConfig, InstructionDataModule
    from swarmtune.tuning.evaluation import EvalConfig, GenerationEval
    from swarmtune.tuning.module import OptimConfig, SwarmLM, TuningConfig

    L.seed_everything(cfg.seed, workers=True)
    output_dir = cfg.output_dir
    with contextlib.ExitStack() as stack:
        model, tokenizer = open_model(stack, cfg, os.path.join(output_dir, "swarm"))
        data = InstructionDataModule(DataConfig(**_plain(cfg.data)), tokenizer)
        eval_config = EvalConfig(**_plain(cfg.eval))
        generation = None
        if eval_config.generate_every_n_val:
            generation = GenerationEval(data.eval_prompts("validation", eval_config.num_samples), tokenizer,
                                        eval_config)
        module = SwarmLM(model, TuningConfig.from_dict(_plain(cfg.tuning)), OptimConfig(**_plain(cfg.optim)),
                         seed=cfg.seed, generation=generation)

        logger = loggers.build_logger(_plain(cfg.logger), output_dir, **_run_names(cfg))
        stack.callback(loggers.finish, logger)
        if logger is not None:
            logger.log_hyperparams(_plain(cfg))
        trainer_args = _plain(cfg.trainer)
        ckpt_path, checkpoint = trainer_args.pop("ckpt_path"), trainer_args.pop("checkpoint")
        checkpoints = ModelCheckpoint(dirpath=os.path.join(output_dir, "checkpoints"), filename="{step}",
                                      **checkpoint)
        trainer = L.Trainer(**trainer_args, default_root_dir=output_dir, logger=logger or False,
                            callbacks=[checkpoints], plugins=[AtomicCheckpointIO()])
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)

        adapter_dir = module.export(cfg.export.dir)
        print(f"Adapter saved to {adapter_dir}", flush=True)
        val_loss = trainer.callback_metrics.get("val/loss")
    return adapter_dir, float(val_loss) if val_loss is not None else math.nan


def _plain(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def _run_names(cfg: DictConfig) -> dict:
    """Logger run name, group and tags from Hydra: a multirun's jobs share a group, each has its own name."""
    hc = HydraConfig.get()
    overrides = hc.job.override_dirname
    multirun = hc.mode.name == "MULTIRUN"
    return dict(name=cfg.logger.get("name") or overrides or None,
                group=cfg.logger.get("group") or (Path(hc.sweep.dir).name if multirun else None),
                tags=[hc.runtime.choices.get("recipe", "custom")])


@hydra.main(config_path=config_path(), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> float:
    """Returns the last validation loss, for Hydra sweepers that optimise it."""
    return run(cfg)[1]


def main() -> None:
    register_recipes()
    _hydra_main()


if __name__ == "__main__":
    main()
