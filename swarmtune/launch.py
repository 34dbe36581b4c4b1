"""What the entry points (train, generate, eval) share: configs, recipes, the model and its swarm.

Configs are found whether swarmtune is installed (as package data) or run from a checkout.
Without swarm peers, an embedded LocalSwarm serves the model for the duration of the command.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from hydra.core.config_store import ConfigStore
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

    peers, dht_prefix = peer_list(swarm.initial_peers), swarm.dht_prefix
    if not peers:
        local = stack.enter_context(LocalSwarm(model_path, spans=[tuple(s) for s in swarm.local_spans],
                                               log_dir=log_dir))
        peers, dht_prefix = local.initial_peers, local.dht_prefix
    return ClientConfig(initial_peers=peers, **OmegaConf.to_container(swarm.client, resolve=True)), dht_prefix


def open_model(stack: contextlib.ExitStack, cfg: DictConfig, log_dir: str | None, **adapters):
    """(model, tokenizer) for `cfg.model` on `cfg.swarm`; `stack` closes the model (and any embedded swarm)."""
    from transformers import AutoTokenizer

    from swarmtune.client.model import SwarmForCausalLM

    model_path = resolve_model(cfg.model)
    client_config, dht_prefix = open_swarm(stack, cfg.swarm, model_path, log_dir)
    model = SwarmForCausalLM.from_pretrained(model_path, client_config=client_config, dtype=cfg.model.dtype,
                                             dht_prefix=dht_prefix, revision=cfg.model.revision, **adapters)
    stack.callback(model.close)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or model_path, revision=cfg.model.revision)
    return model, tokenizer


def peer_list(peers) -> list[str]:
    """Multiaddrs from a list, or from one string of them (as an environment variable holds them)."""
    if isinstance(peers, str):
        return peers.replace(",", " ").split()
    return list(peers or [])
