"""Every recipe composes with the entry point (without starting it), and a 2-job multirun completes."""

from __future__ import annotations

import contextlib
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import psutil
import pytest
import yaml
from hydra import compose
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from setuptools import find_namespace_packages, find_packages

from swarmtune import launch
from swarmtune.adapters.lora import target_shapes
from swarmtune.client.config import ClientConfig
from swarmtune.launch import plain
from swarmtune.models.checkpoint import DTYPES
from swarmtune.tiny_model import tiny_config
from swarmtune.tuning.collab import CollabConfig
from swarmtune.tuning.data import DataConfig
from swarmtune.tuning.module import OptimConfig, TuningConfig
from tests.helpers import PEERS, RECIPES, hydra_context

ROOT = Path(__file__).resolve().parent.parent
HUB_FAMILIES = {"meta-llama/Llama-2-70b-hf": "llama", "mistralai/Mixtral-8x7B-v0.1": "mixtral",
                "meta-llama/Llama-3.1-70B-Instruct": "llama", "Qwen/Qwen3-235B-A22B": "qwen3_moe",
                "openai/gpt-oss-120b": "gpt_oss", "zai-org/GLM-4.5": "glm4_moe",
                "deepseek-ai/DeepSeek-V3": "deepseek_v3"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes(recipe, monkeypatch):
    monkeypatch.setenv("SWARMTUNE_INITIAL_PEERS", ",".join(PEERS))
    with hydra_context():
        cfg = compose("config", overrides=[f"recipe={recipe}"])
    # Everything the entry point builds from the config accepts it.
    DataConfig(**plain(cfg.data))
    tuning = TuningConfig(**plain(cfg.tuning))
    OptimConfig(**plain(cfg.optim))
    trainer = plain(cfg.trainer)
    checkpoint = trainer.pop("checkpoint")
    trainer.pop("ckpt_path")
    assert set(trainer) <= set(inspect.signature(L.Trainer).parameters)
    assert set(checkpoint) <= set(inspect.signature(ModelCheckpoint).parameters)
    ClientConfig(**plain(cfg.swarm.client))
    CollabConfig(**plain(cfg.collab))
    assert cfg.model.dtype in DTYPES
    assert cfg.logger.kind in ("wandb", "csv", "tensorboard", "none")

    if cfg.model.path is None:  # the embedded default
        assert cfg.model.tiny.family and cfg.swarm.initial_peers is None and "local_spans" in cfg.swarm
        family = cfg.model.tiny.family
    else:  # a real hub model on a real swarm
        assert cfg.model.path in HUB_FAMILIES and not os.path.exists(cfg.model.path)
        family = HUB_FAMILIES[cfg.model.path]
        if OmegaConf.is_missing(cfg.swarm, "initial_peers"):
            assert recipe.startswith("ptune")  # the private swarm: peers must be given
        else:
            assert launch.peer_list(cfg.swarm.initial_peers) == PEERS
        assert not cfg.data.path.startswith("pkg://")
    if tuning.lora.enabled:  # target names exist in this family's blocks (some only in DeepSeek's MoE blocks)
        target_shapes(tiny_config(family), tuning.lora.targets)
    assert tuning.lora.enabled or tuning.prompt or tuning.deep_prompt


def test_entry_point_composes_every_recipe_from_any_directory(tmp_path):
    """`python -m swarmtune.train recipe=NAME --cfg job` from an unrelated directory: nothing is started."""
    env = {**os.environ, "SWARMTUNE_INITIAL_PEERS": PEERS[0]}
    runs = {name: subprocess.Popen([sys.executable, "-m", "swarmtune.train", f"recipe={name}", "--cfg", "job"],
                                   cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name in RECIPES}
    helped = subprocess.run([sys.executable, "-m", "swarmtune.train", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        job = yaml.safe_load(out)
        assert set(job) >= {"model", "swarm", "data", "tuning", "optim", "trainer", "logger", "export"}, name
    assert helped.returncode == 0 and "recipe: " + ", ".join(RECIPES) in helped.stdout
    assert not (tmp_path / "outputs").exists()


def test_every_hub_model_config_names_a_supported_family():
    """conf/model entries for real models (with or without a recipe) name a hub id of a family we serve."""
    from swarmtune.models import supported_model_types

    paths = {yaml.safe_load(p.read_text())["path"] for p in (ROOT / "conf" / "model").glob("*.yaml")} - {None}
    assert paths <= set(HUB_FAMILIES), paths - set(HUB_FAMILIES)
    assert {HUB_FAMILIES[p] for p in paths} <= set(supported_model_types())


def test_package_list_is_complete():
    """pyproject lists packages explicitly (for the conf/recipes mapping): none may be forgotten."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set(find_packages(ROOT, include=["swarmtune*"]))
    found |= {"swarmtune.recipes", "swarmtune.conf"} | {f"swarmtune.conf.{p}" for p in find_namespace_packages(
        ROOT / "conf")}
    assert listed == found


@pytest.mark.slow
def test_multirun_runs_each_job_with_its_own_swarm_and_wandb_run(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "SWARMTUNE_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    args = [sys.executable, "-m", "swarmtune.train", "-m", "recipe=tiny_local", "optim.lr=1e-3,3e-4",
            "trainer.max_steps=5", "trainer.val_check_interval=5", f"hydra.sweep.dir={sweep}"]
    log = tmp_path / "multirun.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    servers_seen: set[int] = set()
    most_at_once = 0
    try:
        deadline = time.monotonic() + 400
        while proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            with contextlib.suppress(psutil.Error):
                # direct children only: a server's own short-lived forks (p2pd before exec) share its cmdline
                servers = [p.pid for p in psutil.Process(proc.pid).children()
                           if "swarmtune.server" in " ".join(p.cmdline())]
                servers_seen.update(servers)
                most_at_once = max(most_at_once, len(servers))
            time.sleep(0.2)
    finally:
        children = []
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(proc.pid).children(recursive=True)
        for p in [proc, *children]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.kill()
        proc.wait(10)
        psutil.wait_procs(children, timeout=10)
    output = log.read_text()
    assert proc.returncode == 0, output[-5000:]
    assert len(servers_seen) == 6 and most_at_once == 3  # a fresh 3-server swarm per job, the first one gone
    assert (tmp_path / "cache" / "tiny-llama-6x64" / "config.json").exists()
    wandb_runs = set()
    for job in ("0", "1"):
        job_dir = sweep / job
        assert (job_dir / "adapter" / "adapter_config.json").exists()
        assert f"Adapter saved to {job_dir / 'adapter'}" in output
        assert (job_dir / "swarm" / "dht.log").exists()
        runs = list((job_dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        wandb_runs.add(runs[0].name.rsplit("-", 1)[-1])
    assert len(wandb_runs) == 2
