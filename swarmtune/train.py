"""python -m swarmtune.train [recipe=NAME] [key=value ...]: fine-tune a swarm-served model with Lightning.

With no arguments it runs recipe `tiny_local`: a random tiny model served by an embedded
LocalSwarm on 127.0.0.1 (or by the swarm `python -m swarmtune.swarm up` keeps running), trained
on the bundled instruction set in a minute or two on a CPU. With `swarm.initial_peers=[...]` it
joins an existing swarm instead. Recipes live in the top-level recipes/ folder and are
registered as the Hydra config group `recipe`, so they are found from any working directory,
installed or not. At the end the adapter is exported in PEFT format and its path printed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from swarmtune import errors
from swarmtune.launch import (
    client_settings,
    config_path,
    open_model,
    open_tokenizer,
    plain,
    register_recipes,
    reported,
    run_hydra_app,
    settings,
)


def run(cfg: DictConfig) -> tuple[str, float]:
    """Train as `cfg` says; returns the adapter directory and the last validation loss (nan if none)."""
    client_settings(cfg.swarm)  # first: a recipe's swarm may need peers from the environment
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from swarmtune.tuning import collab as collab_lib
    from swarmtune.tuning import loggers
    from swarmtune.tuning.checkpoint_io import AtomicCheckpointIO
    from swarmtune.tuning.data import DataConfig, InstructionDataModule, load_checked, use_chat_template
    from swarmtune.tuning.evaluation import EvalConfig, GenerationEval
    from swarmtune.tuning.module import OptimConfig, SwarmLM, TuningConfig
    from swarmtune.tuning.progress import progress_bar

    _log_once()
    _quiet()
    # Every setting is checked, and the trainer built, before anything slow starts.
    data_config = settings(DataConfig, cfg.data, "data")
    tuning, optim = settings(TuningConfig, cfg.tuning, "tuning"), settings(OptimConfig, cfg.optim, "optim")
    if (tuning.objective == "dpo") != (data_config.format == "preference"):
        raise errors.UserError(f"tuning.objective={tuning.objective} with data.format={data_config.format}: DPO "
                               "trains on preference pairs, and only DPO does (set both, or neither)")
    eval_config = settings(EvalConfig, cfg.eval, "eval")
    collab = settings(collab_lib.CollabConfig, cfg.collab, "collab")
    if collab.enabled and (cfg.trainer.devices != 1 or cfg.trainer.num_nodes != 1):
        raise errors.UserError("collab.run_id trains one process per peer: set trainer.devices=1 and "
                               "trainer.num_nodes=1 (or use trainer.strategy=ddp without collab)")
    if cfg.generate_every_n_val < 0:
        raise errors.UserError(f"generate_every_n_val must be >= 0, got {cfg.generate_every_n_val}")
    output_dir = cfg.output_dir
    logger = loggers.build_logger(plain(cfg.logger), output_dir, **_run_names(cfg))
    trainer_args = plain(cfg.trainer)
    ckpt_path, checkpoint = trainer_args.pop("ckpt_path"), trainer_args.pop("checkpoint")
    if ckpt_path is not None:
        errors.check_file(ckpt_path, "trainer.ckpt_path")
    try:
        checkpoints = ModelCheckpoint(dirpath=os.path.join(output_dir, "checkpoints"), filename="{step}",
                                      **checkpoint)
        callbacks = [checkpoints, progress_bar()]
        if collab.enabled:
            callbacks.append(collab_lib.CollabProgress(collab.epochs, collab.averaging_timeout))
        trainer = L.Trainer(**trainer_args, default_root_dir=output_dir, logger=logger or False,
                            callbacks=callbacks, plugins=[AtomicCheckpointIO()])
    except Exception as e:  # Lightning's own words on a bad argument
        raise errors.UserError(f"trainer: {e}") from None

    client_settings(cfg.swarm)  # the swarm's settings and the model's path are checked before any data loads
    if cfg.model.path:
        errors.check_source(cfg.model.path, "model.path")
    raw = load_checked(data_config)
    tokenizer = use_chat_template(open_tokenizer(cfg.model), data_config, raw)
    L.seed_everything(cfg.seed, workers=True)
    with contextlib.ExitStack() as stack:
        stack.callback(loggers.finish, logger)
        model, tokenizer = open_model(stack, cfg, os.path.join(output_dir, "swarm"), tokenizer=tokenizer)
        data = InstructionDataModule(data_config, tokenizer, seed=cfg.seed, raw=raw)
        generation = None
        if cfg.generate_every_n_val:
            generation = GenerationEval(data.eval_examples("validation", eval_config.num_samples), tokenizer,
                                        eval_config)
        peers = None
        if collab.enabled:
            dht = collab_lib.start_dht(collab, client_settings(cfg.swarm).swarm_key)
            stack.callback(dht.shutdown)
            peers = collab_lib.Collaboration(collab, dht, data_config.batch_size * trainer.accumulate_grad_batches)
        module = SwarmLM(model, tuning, optim, seed=cfg.seed, generation=generation,
                         generate_every_n_val=cfg.generate_every_n_val, collab=peers)
        if peers is not None:  # before the DHT goes: say goodbye to the other peers, stop the averagers
            stack.callback(lambda: [o.shutdown() for o in trainer.optimizers])
        if logger is not None:
            logger.log_hyperparams(plain(cfg))
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)

        adapter_dir = cfg.export.dir
        if trainer.is_global_zero:  # with data parallelism every rank holds the same adapter: one writes it
            adapter_dir = module.export(cfg.export.dir)
            print(f"Adapter saved to {adapter_dir}", flush=True)
        val_loss = trainer.callback_metrics.get("val/loss")
    return adapter_dir, float(val_loss) if val_loss is not None else math.nan


def _log_once() -> None:
    """Lightning gives its loggers console handlers of their own; under Hydra, whose handlers on the root
    logger print and save every line, that printed each of Lightning's lines twice."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def _quiet() -> None:
    """Lightning's pytree helper makes torch warn of its own deprecated LeafSpec on every run: not ours to fix.
    Outside a terminal, the data set's and checkpoint's progress bars would fill a log with `\\r` updates."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.")
    if not sys.stdout.isatty():
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


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
    with reported():
        return run(cfg)[1]


def main() -> None:
    register_recipes()
    run_hydra_app(_hydra_main, "config")


if __name__ == "__main__":
    main()
