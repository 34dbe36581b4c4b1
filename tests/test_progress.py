"""The training progress bar counts optimizer steps out of max_steps and keeps small metrics readable."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from swarmtune.tuning.progress import StepProgressBar


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
