"""The training progress bar: optimizer steps out of max_steps, and metrics that keep small values readable.

Recipes train for a number of steps across as many epochs as that takes (max_epochs: -1), where
Lightning's default bar counts batches per epoch (as "Epoch 4/-2") and prints a learning rate of
3e-4 as 0.000.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.max_steps < 0:  # training by epochs: Lightning's bar fits
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.total = trainer.max_steps
        bar.n = trainer.global_step  # a resumed run starts where its checkpoint was
        bar.set_description(f"steps (epoch {trainer.current_epoch})")
        bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.max_steps < 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()
