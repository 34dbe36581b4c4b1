"""The training entry point end to end, as real processes: tiny_local training, export parity, resume."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from swarmtune.adapters.peft_format import load_lora
from tests.helpers import adapter_path, reference_model

TOL = 1e-5


def train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_tiny_local_end_to_end(tiny_local_run, tiny_llama, llama_client):
    """The default recipe with its embedded swarm; the exported adapter equals the swarm model's under PEFT."""
    run_dir, output = tiny_local_run
    losses = list(train_losses(run_dir).values())
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert (run_dir / "swarm" / "dht.log").exists()  # its own LocalSwarm served the run
    assert output.count("GPU available") == 1  # Lightning's lines once, through Hydra's logging
    assert "30/30" in output and "/-2" not in output  # the bar counts steps, not epochs of -1
    # piped to a file, as in CI: plain lines, nothing redrawn, no validation bars, no warnings of others' making
    assert "\r" not in output and "Validation" not in output and "LeafSpec" not in output
    assert any(line.startswith("step 30/30 (epoch ") and "train/loss=" in line for line in output.splitlines())
    assert "validation at step 30: val/loss=" in output

    adapter = adapter_path(output)
    assert Path(adapter) == run_dir / "adapter"
    batch = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(reference_model(tiny_llama), adapter)(input_ids=batch).logits
        llama_client.lora = load_lora(adapter, llama_client.config)
        try:
            actual = llama_client(input_ids=batch).logits
        finally:
            llama_client.lora = None
        base = reference_model(tiny_llama)(input_ids=batch).logits
    assert float((actual - expected).abs().max()) <= TOL
    assert float((base - expected).abs().max()) > 1e-3  # training changed the model


def test_killed_run_resumes_from_checkpoint(tmp_path, tiny_llama, llama_swarm, train_process):
    """SIGKILL mid-run, then trainer.ckpt_path=... continues at the checkpoint's step up to max_steps."""
    peers = ",".join(f"'{p}'" for p in llama_swarm.initial_peers)
    common = [f"model.path={tiny_llama}", f"swarm.initial_peers=[{peers}]", "logger=csv", "trainer.max_steps=40",
              "trainer.val_check_interval=20"]
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first = train_process(common + [f"hydra.run.dir={first_dir}"], tmp_path / "first.log")
    last = first_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not (first_dir / "checkpoints" / "step=20.ckpt").exists() and not (
            first_dir / "checkpoints" / "step=30.ckpt").exists():
        assert first.proc.poll() is None, first.output()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 20 in time:\n" + first.output()[-3000:]
        time.sleep(0.05)
    first.stop()
    assert first.proc.returncode == -9

    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    step = checkpoint["global_step"]
    assert 10 <= step < 40
    assert set(checkpoint["state_dict"]) == {k for k in checkpoint["state_dict"] if k.startswith("lora.lora_")}
    assert len(checkpoint["state_dict"]) == 2 * 6 * 7  # A and B of every projection of every block, nothing else
    assert checkpoint["optimizer_states"] and os.path.getsize(last) < 2_000_000

    second = train_process(common + [f"hydra.run.dir={second_dir}", f"trainer.ckpt_path={last}"],
                           tmp_path / "second.log")
    second.wait(timeout=240)
    steps = sorted(train_losses(second_dir))
    assert steps == list(range(step, 40))
    final = torch.load(second_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 40


def test_wandb_goes_offline_without_credentials(tmp_path, monkeypatch):
    from swarmtune.tuning import loggers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no stored wandb key
    assert loggers.wandb_mode("auto") == "offline"
    assert loggers.wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert loggers.wandb_mode("online") == "offline"  # the environment wins, as in tests and CI
    started = time.monotonic()
    assert not loggers._reachable("127.0.0.1", 9, timeout=5.0)  # nothing listens on the discard port
    assert time.monotonic() - started < 1.0  # refused at once, not timed out


def test_a_wandb_run_starts_without_warnings(tmp_path, monkeypatch, capfd):
    """Lightning hands wandb anonymous=None, which wandb warns of on every run as a setting that has no effect."""
    from swarmtune.tuning import loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = loggers.build_logger({"kind": "wandb"}, str(tmp_path), name="quiet")
    try:
        assert logger.experiment.name == "quiet"  # wandb.init, as the first logged value would do it
    finally:
        loggers.finish(logger)
    err = capfd.readouterr().err
    assert "anonymous" not in err and "WARNING" not in err, err


@pytest.mark.slow  # a second training run
def test_the_seed_decides_the_data_split(tiny_local_run, tiny_llama, llama_swarm, train_process, tmp_path):
    """seed=1 holds out other validation rows than the default seed 0 (whose run is tiny_local_run)."""
    peers = ",".join(f"'{p}'" for p in llama_swarm.initial_peers)
    run_dir = tmp_path / "run"
    train_process([f"model.path={tiny_llama}", f"swarm.initial_peers=[{peers}]", "logger=csv", "seed=1",
                   "trainer.max_steps=1", "trainer.val_check_interval=1", "eval.max_new_tokens=1",
                   f"hydra.run.dir={run_dir}"], tmp_path / "train.log").wait(timeout=240)

    def validation_prompts(directory: Path) -> set[str]:
        rows = [json.loads(line) for line in (directory / "samples.jsonl").read_text().splitlines()]
        first = min(r["step"] for r in rows)
        return {r["prompt"] for r in rows if r["step"] == first}

    seed0, seed1 = validation_prompts(tiny_local_run[0]), validation_prompts(run_dir)
    assert len(seed0) == len(seed1) == 8 and seed0 != seed1


def metric_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_dpo_end_to_end(tmp_path, tiny_llama, llama_swarm, train_process):
    """The DPO recipe through the entry point: the first loss ln 2, the rewards logged, validation with its
    reward accuracy; the exported adapter, loaded with plain PEFT, prefers the held-out chosen answers."""
    from tests.test_dpo import pairs_preferred

    run_dir = tmp_path / "run"
    output = train_process(["recipe=tiny_dpo", "trainer.max_steps=20", f"model.path={tiny_llama}", "logger=csv",
                            f"swarm.initial_peers={json.dumps(llama_swarm.initial_peers)}",
                            f"hydra.run.dir={run_dir}"], tmp_path / "train.log").wait(timeout=900)
    rows = metric_rows(run_dir)
    train = [r for r in rows if r.get("train/loss")]
    assert abs(float(train[0]["train/loss"]) - math.log(2)) <= 1e-6
    assert all(r["train/reward_accuracy"] and r["train/reward_margin"] and r["train/rewards_chosen"]
               and r["train/rewards_rejected"] for r in train)
    val = [r for r in rows if r.get("val/reward_accuracy")]
    assert val and float(val[-1]["val/reward_accuracy"]) >= 0.9 and float(val[-1]["val/reward_margin"]) > 0
    accuracy, margin = pairs_preferred(tiny_llama, adapter_path(output))
    assert accuracy >= 0.9 and margin > 0.05


@pytest.mark.slow
def test_tiny_chat_end_to_end(tmp_path, tiny_llama, llama_swarm, train_process):
    """The chat recipe: the loss on assistant turns falls, and validation decodes after the chat prompt."""
    run_dir = tmp_path / "run"
    output = train_process(["recipe=tiny_chat", "trainer.max_steps=20", f"model.path={tiny_llama}", "logger=csv",
                            f"swarm.initial_peers={json.dumps(llama_swarm.initial_peers)}",
                            f"hydra.run.dir={run_dir}"], tmp_path / "train.log").wait(timeout=900)
    losses = list(train_losses(run_dir).values())
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].endswith("Assistant:") for s in samples)
    assert Path(adapter_path(output)).is_dir()
