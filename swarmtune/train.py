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
import importlib.util
import math
import os
import shutil
import tempfile
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

_CHECKOUT = Path(__file__).resolve().parent.parent


def config_path() -> str:
    """The packaged configs (pkg://) when installed with them, else the checkout's conf/ folder."""
    if importlib.util.find_spec("swarmtune.conf") is not None:
        return "pkg://swarmtune.conf"
    return str(_CHECKOUT / "conf")


def recipes_dir() -> Traversable:
    if importlib.util.find_spec("swarmtune.recipes") is not None:
        return resources.files("swarmtune.recipes")
    return _CHECKOUT / "recipes"


def register_recipes() -> list[str]:
    """Store every recipes/*.yaml in Hydra's ConfigStore as option NAME of group `recipe` (global package).

    A search path cannot do this: Hydra names groups after folders, and the folder is `recipes/`.
    """
    store = ConfigStore.instance()
    names = []
    for entry in sorted(recipes_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            name = entry.name[:-len(".yaml")]
            store.store(group="recipe", name=name, node=OmegaConf.create(entry.read_text()), package="_global_")
            names.append(name)
    return names


def tiny_model_path(spec: DictConfig, cache_dir: str) -> str:
    """A random tiny checkpoint made once into `cache_dir`; atomic, so concurrent runs may race safely."""
    from swarmtune.tiny_model import make_tiny_model

    cache_dir = os.path.expanduser(cache_dir)
    path = os.path.join(cache_dir, f"tiny-{spec.family}-{spec.layers}x{spec.hidden}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".making-")
    try:
        make_tiny_model(spec.family, tmp, layers=spec.layers, hidden=spec.hidden)
        os.rename(tmp, path)
    except OSError:
        if not os.path.exists(os.path.join(path, "config.json")):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model(model: DictConfig) -> str:
    """The checkpoint to use: `model.path`, or the tiny demo model (made on first use)."""
    return model.path or tiny_model_path(model.tiny, model.cache_dir)


def open_swarm(stack: contextlib.ExitStack, swarm: DictConfig, model_path: str, log_dir: str | None):
    """(ClientConfig, DHT prefix) for the configured swarm; with no peers, an embedded LocalSwarm
    whose processes `stack` stops on exit."""
    from swarmtune.client.config import ClientConfig
    from swarmtune.swarm import LocalSwarm

    peers, dht_prefix = _peer_list(swarm.initial_peers), swarm.dht_prefix
    if not peers:
        local = stack.enter_context(LocalSwarm(model_path, spans=[tuple(s) for s in swarm.local_spans],
                                               log_dir=log_dir))
        peers, dht_prefix = local.initial_peers, local.dht_prefix
    return ClientConfig(initial_peers=peers, **OmegaConf.to_container(swarm.client, resolve=True)), dht_prefix


def run(cfg: DictConfig) -> tuple[str, float]:
    """Train as `cfg` says; returns the adapter directory and the last validation loss (nan if none)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from transformers import AutoTokenizer

    from swarmtune.client.model import SwarmForCausalLM
    from swarmtune.tuning import loggers
    from swarmtune.tuning.checkpoint_io import AtomicCheckpointIO
    from swarmtune.tuning.data import DataConfig, InstructionDataModule
    from swarmtune.tuning.evaluation import EvalConfig, GenerationEval
    from swarmtune.tuning.module import OptimConfig, SwarmLM, TuningConfig

    L.seed_everything(cfg.seed, workers=True)
    output_dir = cfg.output_dir
    model_path = resolve_model(cfg.model)
    with contextlib.ExitStack() as stack:
        client_config, dht_prefix = open_swarm(stack, cfg.swarm, model_path, os.path.join(output_dir, "swarm"))
        model = SwarmForCausalLM.from_pretrained(model_path, client_config=client_config, dtype=cfg.model.dtype,
                                                 dht_prefix=dht_prefix, revision=cfg.model.revision)
        stack.callback(model.close)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or model_path, revision=cfg.model.revision)
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


def _peer_list(peers) -> list[str]:
    """Multiaddrs from a list, or from one string of them (as an environment variable holds them)."""
    if isinstance(peers, str):
        return peers.replace(",", " ").split()
    return list(peers or [])


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
