"""Training progress: a bar in a terminal, plain lines in a log.

Recipes train for a number of steps across as many epochs as that takes (max_epochs: -1), where
Lightning's default bar counts batches per epoch (as "Epoch 4/-2") and prints a learning rate of
3e-4 as 0.000. Its bar takes what the metrics leave of the line, down to `|█|`, and then the
metrics are cut; piped to a file, every update adds a `\\r` line and every validation a bar of its
own. So: in a terminal, `StepProgressBar` counts optimizer steps and gives its bar only the room
the text leaves; elsewhere (a log file, CI), `LogProgress` writes a line every
`trainer.log_every_n_steps` steps and one per validation.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

TEXT = "{desc}{n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"  # (tqdm's desc ends in ": ")
WITH_BAR = "{desc}{percentage:3.0f}%%|{bar:%d}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
METRICS = "{desc}{n_fmt}/{total_fmt}{postfix}"  # where even the times leave the metrics too little room
BAR_COLUMNS = (10, 40)  # the bar's narrowest and widest; narrower than that, it is left out


def progress_bar() -> ProgressBar:
    """The bar for a terminal, plain lines for anything else."""
    return StepProgressBar() if sys.stdout.isatty() else LogProgress()


def fitted_format(fields: dict, columns: int) -> str:
    """A bar format whose bar takes what the text (description, counts, times, metrics) leaves of `columns`: the
    bar goes first, then the times, so that the metrics stay whole."""
    text = Tqdm.format_meter(**{**fields, "bar_format": TEXT, "ncols": None})
    room = min(BAR_COLUMNS[1], columns - len(text) - len("100%|| "))
    if room >= BAR_COLUMNS[0]:
        return WITH_BAR % room
    return TEXT if len(text) <= columns else METRICS


class _FittedTqdm(Tqdm):
    @property
    def format_dict(self) -> dict:
        fields = super().format_dict
        fields["bar_format"] = fitted_format(fields, fields.get("ncols") or shutil.get_terminal_size().columns)
        return fields


def _without_version(metrics: dict) -> dict:
    metrics.pop("v_num", None)  # the logger's run version: nothing to watch
    return metrics


class StepProgressBar(TQDMProgressBar):
    """Optimizer steps out of max_steps, metrics in full, and log lines printed above the bar, not onto it."""

    def __init__(self) -> None:
        super().__init__()
        self._redirect = contextlib.ExitStack()

    def init_train_tqdm(self) -> Tqdm:
        return _FittedTqdm(desc=self.train_description, position=2 * self.process_position, disable=self.is_disabled,
                           leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=TEXT)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return _without_version(super().get_metrics(trainer, pl_module))

    def on_train_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        self._redirect.enter_context(logging_redirect_tqdm())

    def on_train_end(self, *args) -> None:
        super().on_train_end(*args)
        self._redirect.close()

    def on_exception(self, *args) -> None:
        self._redirect.close()

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.max_steps < 0:  # training by epochs: Lightning's counts fit
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


class LogProgress(ProgressBar):
    """A plain line every `trainer.log_every_n_steps` optimizer steps (and at the last), and one per validation:
    output that reads well in a log file, with nothing redrawn."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._started = time.monotonic()
        self._first = self._last = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return _without_version(super().get_metrics(trainer, pl_module))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started, self._first = time.monotonic(), trainer.global_step
        self._last = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        if not self._enabled or step == self._last or step % max(1, trainer.log_every_n_steps) and step != total:
            return
        self._last = step
        elapsed = time.monotonic() - self._started
        per_step = elapsed / max(1, step - self._first)
        timing = f"{elapsed:.0f} s, {per_step:.2f} s/step"
        if math.isfinite(total):
            timing += f", ~{per_step * (total - step):.0f} s left"
        shown = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if not k.startswith("val/")}
        self._print(f"step {step}/{total if math.isfinite(total) else '?'} (epoch {trainer.current_epoch}, {timing})",
                    shown)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and not trainer.sanity_checking:  # every validation metric, not only the bar's
            shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self._print(f"validation at step {trainer.global_step}", shown)

    @staticmethod
    def _print(head: str, metrics: dict) -> None:
        values = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        print(f"{head}: {values}" if values else head, flush=True)
