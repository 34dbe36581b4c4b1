"""The training progress bar counts optimizer steps out of max_steps and keeps small metrics readable; a log gets
plain lines instead."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from swarmtune.tuning.progress import LogProgress, StepProgressBar, progress_bar


class Quadratic(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=3e-4)

    def train_dataloader(self):
        return DataLoader(torch.zeros(4, 1), batch_size=1)  # 4 steps per epoch


def test_steps_across_epochs_and_a_readable_learning_rate(capsys):
    trainer = L.Trainer(max_steps=10, max_epochs=-1, callbacks=[StepProgressBar()], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Quadratic())
    shown = capsys.readouterr().out  # where Lightning puts its bars
    assert trainer.global_step == 10 and trainer.current_epoch >= 2
    assert "10/10" in shown and "/-2" not in shown and "/-1" not in shown
    assert "lr=0.0003" in shown and "lr=0.000 " not in shown


class Validated(Quadratic):
    """Logs the metrics a training run shows (long names, small values), and validates."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log_dict({"train/loss": loss, "tokens_per_s": 1234.5}, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", 5.678, prog_bar=True)
        self.log_dict({"val/ppl": 292.1, "val/exact_match": 0.25})  # not on the bar

    def val_dataloader(self):
        return DataLoader(torch.zeros(3, 1), batch_size=1)


def fit(progress, **kwargs) -> L.Trainer:
    trainer = L.Trainer(max_steps=10, max_epochs=-1, callbacks=[progress], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", val_check_interval=4, **kwargs)
    trainer.fit(Validated())
    return trainer


def test_a_log_gets_plain_lines(capsys):
    """Piped to a file: a line every log_every_n_steps steps and at the last, one per validation; nothing redrawn."""
    assert isinstance(progress_bar(), LogProgress)  # pytest's stdout is not a terminal
    fit(LogProgress(), log_every_n_steps=3)
    shown = capsys.readouterr().out
    assert "\r" not in shown and "Validation" not in shown
    lines = shown.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" ", 2)[1] for line in steps] == ["3/10", "6/10", "9/10", "10/10"], shown
    assert "train/loss=" in steps[0] and "lr=0.0003" in steps[0] and "tokens_per_s=1234" in steps[0]
    assert "s left)" in steps[0] and "val/" not in steps[0]
    validations = [line for line in lines if line.startswith("validation at step ")]
    assert len(validations) == 2 and "val/loss=5.678 val/ppl=292.1 val/exact_match=0.25" in validations[0]


def test_a_terminal_bar_never_squeezes_the_metrics(capsys, monkeypatch):
    """At 120 columns the bar takes only what the text leaves, and the metrics are shown whole."""
    monkeypatch.setenv("COLUMNS", "120")
    fit(StepProgressBar())
    shown = capsys.readouterr().out
    lines = [line.rstrip() for chunk in shown.split("\r") for line in chunk.split("\n") if line.startswith("steps")]
    last = lines[-1]
    assert "10/10" in last and "v_num" not in last
    for name in ("train/loss=", "lr=", "tokens_per_s=", "val/loss="):
        assert name in last, last
    assert all(len(line) <= 120 for line in lines), max(lines, key=len)
    assert "|" + "█" * 10 in last  # what the metrics leave is room for a bar still
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    fit(StepProgressBar())
    wide = [line for line in capsys.readouterr().out.split("\r") if line.startswith("steps")][-1]
    assert "|" + "█" * 40 + "|" in wide  # with room to spare, a bar of its full width
