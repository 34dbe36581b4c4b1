"""Data parallelism with Lightning's own DDP (gloo on CPU), through the training entry point as real processes:
2 ranks equal 1 rank accumulating both ranks' batches, a server SIGKILLed mid-step changes nothing, the
checkpoints and the export are written once, and a run resumes."""

from __future__ import annotations

import contextlib
import time
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoConfig

from swarmtune import launch
from swarmtune.adapters.peft_format import ADAPTER_WEIGHTS, load_lora
from swarmtune.local_swarm import LocalSwarm
from swarmtune.tuning.data import DataConfig, InstructionDataModule, collate
from swarmtune.tuning.module import OptimConfig, SwarmLM, TuningConfig
from tests.helpers import adapter_path

STEPS, BATCH, SEED = 4, 4, 0
COMMON = ["recipe=tiny_local", f"trainer.max_steps={STEPS}", f"data.batch_size={BATCH}", f"seed={SEED}",
          "trainer.val_check_interval=2", "trainer.checkpoint.every_n_train_steps=2", "generate_every_n_val=0",
          "logger=csv"]
DDP = ["trainer.devices=2", "trainer.strategy=ddp"]


def peers_override(swarm: LocalSwarm) -> str:
    return "swarm.initial_peers=[" + ",".join(f"'{p}'" for p in swarm.initial_peers) + "]"


def adapter_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / ADAPTER_WEIGHTS))


def assert_same_adapter(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert float((actual[key] - value).abs().max()) <= 1e-5, key


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_llama):
    """Two ranks on the embedded swarm that rank 0 starts: (run dir, output of rank 0)."""
    from tests.helpers import TrainProcess

    tmp = tmp_path_factory.mktemp("ddp")
    process = TrainProcess([*COMMON, *DDP, f"model.path={tiny_llama}", f"hydra.run.dir={tmp / 'run'}"],
                           tmp / "train.log")
    try:
        return tmp / "run", process.wait(timeout=300)
    finally:
        process.stop()


def one_rank_accumulating(tiny_llama: str, swarm: LocalSwarm, out_dir: Path,
                          recipe: str = "tiny_local") -> dict[str, torch.Tensor]:
    """The same training in this process on 1 rank: each step accumulates rank 0's batch, then rank 1's."""
    overrides = [*COMMON, f"model.path={tiny_llama}", peers_override(swarm)]
    overrides[0] = f"recipe={recipe}"
    launch.register_recipes()
    with launch.composed("config", overrides) as cfg, contextlib.ExitStack() as stack:
        L.seed_everything(SEED, workers=True)
        model, tokenizer = launch.open_model(stack, cfg, None)
        data = InstructionDataModule(launch.settings(DataConfig, cfg.data, "data"), tokenizer, seed=SEED)
        data.setup()
        module = SwarmLM(model, launch.settings(TuningConfig, cfg.tuning, "tuning"),
                         launch.settings(OptimConfig, cfg.optim, "optim"), seed=SEED)
        shards = [list(DistributedSampler(data.train, num_replicas=2, rank=r, shuffle=True, seed=SEED))
                  for r in (0, 1)]
        batches = [shards[r][k * BATCH:(k + 1) * BATCH] for k in range(STEPS) for r in (0, 1)]
        loader = DataLoader(data.train, batch_sampler=batches, collate_fn=partial(collate, pad_id=data.pad_id))
        trainer_args = launch.plain(cfg.trainer)
        for key in ("ckpt_path", "checkpoint", "val_check_interval", "devices", "strategy", "num_nodes"):
            trainer_args.pop(key)
        trainer = L.Trainer(**trainer_args | {"accumulate_grad_batches": 2, "limit_val_batches": 0}, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(module, train_dataloaders=loader)
        return adapter_tensors(module.export(str(out_dir)))


def test_two_ranks_equal_one_rank_fed_both_ranks_batches(ddp_run, tiny_llama, llama_swarm, tmp_path):
    run_dir, output = ddp_run
    assert output.count("Joined the embedded swarm of rank 0") == 1  # rank 1 did not start a swarm of its own
    assert output.count("Adapter saved to") == 1
    expected = one_rank_accumulating(tiny_llama, llama_swarm, tmp_path / "baseline")
    assert_same_adapter(adapter_tensors(adapter_path(output)), expected)


def test_checkpoints_and_export_are_written_once_and_load(ddp_run, tiny_llama):
    run_dir, output = ddp_run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", f"step={STEPS}.ckpt"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == STEPS
    lora = load_lora(adapter_path(output), AutoConfig.from_pretrained(tiny_llama))
    assert lora.rank == 8
    assert "val/loss" in (run_dir / "csv" / "metrics.csv").read_text()


@pytest.mark.slow  # another two-rank run
def test_server_killed_mid_step_changes_nothing(ddp_run, tiny_llama, tmp_path, train_process):
    """The only server of blocks 2:5, slowed so that most of each step is spent in it, is SIGKILLed after step 2;
    a replacement comes up; both ranks replay and end with the adapter of the run without the kill."""
    run_dir = tmp_path / "run"
    with LocalSwarm(tiny_llama, spans=[(0, 2), (5, 6)]) as swarm:
        victim = swarm.add_server((2, 5), fault="delay=0.2")
        process = train_process([*COMMON, *DDP, f"model.path={tiny_llama}", peers_override(swarm),
                                 f"hydra.run.dir={run_dir}"], tmp_path / "train.log")
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "step=2.ckpt").exists():
            assert time.monotonic() < deadline and process.proc.poll() is None, process.output()[-3000:]
            time.sleep(0.05)
        victim.kill()
        swarm.add_server((2, 5), wait=False)
        output = process.wait(timeout=300)
    logs = "".join((run_dir / name).read_text() for name in ("train.log", "train_ddp_process_1.log"))
    assert "replayed blocks 2:5" in logs  # the kill cost a rank a request in flight
    assert_same_adapter(adapter_tensors(adapter_path(output)), adapter_tensors(adapter_path(ddp_run[1])))


@pytest.mark.slow  # another two-rank run
def test_ddp_run_resumes_from_its_checkpoint(ddp_run, tiny_llama, llama_swarm, tmp_path, train_process):
    run_dir, _ = ddp_run
    resumed, last = tmp_path / "resumed", run_dir / "checkpoints" / "last.ckpt"
    process = train_process([*COMMON, *DDP, f"model.path={tiny_llama}", peers_override(llama_swarm),
                             f"trainer.max_steps={STEPS + 2}", f"trainer.ckpt_path={last}", f"hydra.run.dir={resumed}"],
                            tmp_path / "resumed.log")
    output = process.wait(timeout=300)
    assert output.count("Adapter saved to") == 1
    checkpoint = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == STEPS + 2


@pytest.mark.slow
def test_two_ranks_of_dpo_equal_one_rank_fed_both_ranks_batches(tiny_llama, llama_swarm, tmp_path, train_process):
    """DPO (each rank's reference from the swarm with its adapter off) averages over ranks as SFT does."""
    args = ["recipe=tiny_dpo", *COMMON[1:], *DDP, f"model.path={tiny_llama}", peers_override(llama_swarm),
            f"hydra.run.dir={tmp_path / 'run'}"]
    output = train_process(args, tmp_path / "train.log").wait(timeout=600)
    expected = one_rank_accumulating(tiny_llama, llama_swarm, tmp_path / "baseline", recipe="tiny_dpo")
    assert_same_adapter(adapter_tensors(adapter_path(output)), expected)
