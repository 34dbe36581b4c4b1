"""SwarmLM: a LightningModule that fine-tunes a swarm-served model through client-owned parameters.

The frozen blocks run on the swarm (`SwarmForCausalLM`); everything trainable lives here:
LoRA matrices for the remote blocks' projections (sent with every request), soft prompts
(input prefix and/or per-block deep prompts) and optionally the LM head. Checkpoints hold only
that trainable state, so a checkpoint of a 70B fine-tune stays a few megabytes. The objective is
next-token loss on the labels (sft) or DPO on preference pairs (dpo, see swarmtune.tuning.dpo).
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import lightning as L
import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from swarmtune.adapters.lora import ClientLora, target_shapes
from swarmtune.adapters.peft_format import save_adapter
from swarmtune.adapters.prompts import SoftPrompts
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.errors import check_positive
from swarmtune.tuning import collab as collab_lib
from swarmtune.tuning import dpo
from swarmtune.tuning.data import IGNORE
from swarmtune.tuning.evaluation import GenerationEval, log_samples, write_samples


@dataclass
class LoraSettings:
    enabled: bool = True
    rank: int = 8
    alpha: float = 16.0
    dropout: float = field(default=0.0, metadata={"help": "on the adapter's input, in training only"})
    targets: list[str] | None = field(default=None, metadata={
        "help": "projections by short name (q_proj) or path inside the block; null: all the family supports"})
    blocks: list[int] | None = field(default=None, metadata={"help": "block indices; null: every block"})
    use_rslora: bool = field(default=False, metadata={"help": "scale by alpha / sqrt(rank), not alpha / rank"})

    def __post_init__(self):
        check_positive(self, "rank")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must lie in [0, 1), got {self.dropout}")


OBJECTIVES = ("sft", "dpo")


@dataclass
class TuningConfig:
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompt: bool = field(default=False, metadata={"help": "a trainable prefix of input embeddings"})
    deep_prompt: bool = field(default=False, metadata={"help": "a trainable prefix added before every block"})
    prefix_length: int = field(default=16, metadata={"help": "positions the soft prompts take before each example"})
    train_lm_head: bool = False
    objective: str = field(default="sft", metadata={
        "help": "sft: next-token loss on the labels; dpo: DPO on preference pairs (data.format=preference), "
                "the reference being the swarm with the adapter off"})
    beta: float = field(default=0.1, metadata={"help": "DPO's beta: how far from the reference the policy may go"})

    def __post_init__(self):
        if isinstance(self.lora, dict):  # as a config file gives it
            self.lora = LoraSettings(**self.lora)
        check_positive(self, "prefix_length")
        check_positive(self, "beta")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is unknown: use one of {', '.join(OBJECTIVES)}")
        if self.objective == "dpo" and self.train_lm_head:
            raise ValueError("objective=dpo takes its reference from the model with the adapter off, and a trained "
                             "LM head cannot be switched off without a second copy: set train_lm_head=false")
        if not (self.lora.enabled or self.prompt or self.deep_prompt or self.train_lm_head):
            raise ValueError("nothing to train: enable lora, prompt, deep_prompt or train_lm_head")


OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass
class OptimConfig:
    name: str = field(default="adamw", metadata={"help": "adamw, adam or sgd"})
    lr: float = 2e-4
    prompt_lr: float | None = field(default=None, metadata={"help": "for soft prompts, which usually want a "
                                                                     "larger rate; null: lr"})
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = field(default=0.9, metadata={"help": "sgd only"})
    scheduler: str = field(default="cosine", metadata={"help": "a transformers.get_scheduler name: linear, "
                                                                "cosine, constant, ..."})
    warmup_steps: int = 0

    def __post_init__(self):
        from transformers import SchedulerType

        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}: use one of {', '.join(OPTIMIZERS)}")
        schedulers = [s.value for s in SchedulerType]
        if self.scheduler not in schedulers:
            raise ValueError(f"unknown scheduler {self.scheduler!r}: use one of {', '.join(schedulers)}")
        check_positive(self, "lr")
        check_positive(self, "prompt_lr", optional=True)
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0")


class SwarmLM(L.LightningModule):
    def __init__(self, model: SwarmForCausalLM, tuning: TuningConfig, optim: OptimConfig, seed: int = 0,
                 generation: GenerationEval | None = None, generate_every_n_val: int = 1,
                 collab: collab_lib.Collaboration | None = None):
        """`collab`: train with other peers through hivemind.Optimizer (see swarmtune.tuning.collab)."""
        super().__init__()
        self.tuning, self.optim = tuning, optim
        self.collab = collab
        self.generation = generation  # examples decoded through the swarm in every Nth validation run
        self.generate_every_n_val = generate_every_n_val
        self._validations = 0
        config = model.config
        # Trainable modules are registered before `model`, so checkpoint keys read "lora.…", "soft_prompts.…".
        self.lora: ClientLora | None = None
        if tuning.lora.enabled:
            shapes = target_shapes(config, tuning.lora.targets, tuning.lora.blocks)
            self.lora = ClientLora(shapes, tuning.lora.rank, tuning.lora.alpha, tuning.lora.dropout,
                                   tuning.lora.use_rslora)
        self.soft_prompts: SoftPrompts | None = None
        if tuning.prompt or tuning.deep_prompt:
            self.soft_prompts = SoftPrompts(tuning.prefix_length, config.hidden_size, config.num_hidden_layers,
                                       shallow=tuning.prompt, deep=tuning.deep_prompt,
                                       init_embeddings=model.parts.embed_tokens.weight, seed=seed)
        self.model = model.requires_grad_(False)
        self.model.lora = self.lora
        self.model.soft_prompts = self.soft_prompts
        if tuning.train_lm_head:
            head = model.parts.lm_head
            # A fresh parameter unties it from the input embeddings, as PEFT's modules_to_save does.
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=True)
        if not any(p.requires_grad for p in self.parameters()):
            raise ValueError("Nothing to train: enable lora, prompt, deep_prompt or train_lm_head")
        self._batch_started = 0.0

    # ---- the model ----------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.tuning.objective == "dpo":
            loss, metrics = dpo.step(self.model, batch, self.tuning.beta)
            pairs = batch["input_ids"].shape[0] // 2
            for name, value in metrics.items():
                self.log(f"train/{name}", value, prog_bar=name == "reward_accuracy", batch_size=pairs)
        else:
            loss = self(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.tuning.objective == "dpo":  # every metric a mean over pairs, of every rank's batches
            loss, metrics = dpo.step(self.model, batch, self.tuning.beta)
            pairs = batch["input_ids"].shape[0] // 2
            for name, value in {"loss": loss, **metrics}.items():
                self.log(f"val/{name}", value, prog_bar=name in ("loss", "reward_accuracy"), batch_size=pairs,
                         sync_dist=True)
            return loss
        loss = self(**batch).loss
        # Weighted by response tokens, so the epoch's val/loss is the mean NLL per token, as swarmtune.eval's.
        # With data parallelism, averaged over every rank's batches (by the same weights).
        tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
        self.log("val/loss", loss, prog_bar=True, batch_size=tokens, sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None and self.tuning.objective == "sft":
            self.log("val/ppl", math.exp(min(float(loss), 50.0)), sync_dist=True)
        if self.generation is None or self.trainer.sanity_checking:
            return
        self._validations += 1
        every = self.generate_every_n_val
        if every and self._validations % every == 0:
            self.evaluate_generation()

    def evaluate_generation(self) -> dict[str, float]:
        """Greedy-decode the validation prompts through inference sessions with the current adapter; log the
        scores as val/..., the samples to samples.jsonl in the run directory and, on wandb, as a table.
        With data parallelism rank 0 decodes, and every rank logs its scores."""
        zero = self.trainer.is_global_zero
        metrics, samples = self.generation.run(self.model) if zero else ({}, [])
        metrics = self.trainer.strategy.broadcast(metrics, src=0)
        for name, value in metrics.items():
            self.log(f"val/{name}", value, sync_dist=True)
        if zero:
            write_samples(os.path.join(self.trainer.default_root_dir, "samples.jsonl"), samples, step=self.global_step)
            log_samples(self.logger, samples, self.global_step)
        return metrics

    # ---- throughput ---------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        """Tokens per second of the whole step: forward and backward through the swarm, optimizer."""
        tokens = int(batch["attention_mask"].sum())
        self.log("tokens_per_s", tokens / max(time.perf_counter() - self._batch_started, 1e-9), prog_bar=True)

    # ---- optimization -------------------------------------------------------------------------------

    def configure_optimizers(self):
        from transformers import get_scheduler

        prompt_params = list(self.soft_prompts.parameters()) if self.soft_prompts is not None else []
        prompt_ids = {id(p) for p in prompt_params}
        other = [p for p in self.parameters() if p.requires_grad and id(p) not in prompt_ids]
        groups = [g for g in ({"params": other, "lr": self.optim.lr},
                              {"params": prompt_params, "lr": self.optim.prompt_lr or self.optim.lr}) if g["params"]]
        o = self.optim

        def make_optimizer(groups) -> torch.optim.Optimizer:
            if o.name == "adamw":
                return torch.optim.AdamW(groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
            if o.name == "adam":
                return torch.optim.Adam(groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)  # the last name

        def make_scheduler(optimizer: torch.optim.Optimizer, total: float):
            return get_scheduler(o.scheduler, optimizer, num_warmup_steps=o.warmup_steps,
                                 num_training_steps=int(total) if math.isfinite(total) else None)

        if self.collab is not None:  # hivemind steps the schedule once per collaboration epoch
            c = self.collab
            statistics = ("exp_avg", "exp_avg_sq") if o.name in ("adam", "adamw") else \
                ("momentum_buffer",) if o.momentum else ()
            return collab_lib.wrap_optimizer(c.config, c.dht, groups, make_optimizer,
                                             lambda opt: make_scheduler(opt, c.config.epochs), c.samples_per_step,
                                             statistics)
        optimizer = make_optimizer(groups)
        scheduler = make_scheduler(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints: trainable state only ----------------------------------------------------------

    def trainable_parameters(self) -> OrderedDict[str, nn.Parameter]:
        return OrderedDict((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def state_dict(self, *args, **kwargs) -> OrderedDict[str, torch.Tensor]:
        """Only what training changes: the frozen model is the swarm's, not the checkpoint's."""
        return OrderedDict((n, p.detach()) for n, p in self.trainable_parameters().items())

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False) -> _IncompatibleKeys:
        params = self.trainable_parameters()
        missing = [k for k in params if k not in state_dict]
        unexpected = [k for k in state_dict if k not in params]
        if strict and (missing or unexpected):
            raise RuntimeError(f"Checkpoint does not match this tuning setup: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, value in state_dict.items():
                if name in params:
                    params[name].copy_(value)
        return _IncompatibleKeys(missing, unexpected)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["swarmtune"] = {"base_model": self.model.model_name, "tuning": asdict(self.tuning)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("swarmtune", {})
        if saved.get("tuning") not in (None, asdict(self.tuning)):
            raise RuntimeError(f"Checkpoint was trained with tuning {saved['tuning']}, not {asdict(self.tuning)}")

    # ---- export ---------------------------------------------------------------------------------------

    def export(self, out_dir: str) -> str:
        """PEFT-format LoRA (+ LM head) and soft prompts, loadable without swarmtune by plain PEFT."""
        head = self.model.parts.lm_head.weight if self.tuning.train_lm_head else None
        return save_adapter(out_dir, self.model.config, self.model.model_name, lora=self.lora,
                            soft_prompts=self.soft_prompts, lm_head=head)
