"""Adapters a server hosts for everyone: clients name one and send no adapter weights at all.

Useful when many users generate with the same fine-tune. The server loads the PEFT-format LoRA
once (shapes checked against the served model) and applies it to the requests that name it,
side by side with requests that bring their own adapter or none.
"""

from __future__ import annotations

import logging
import os

from transformers import PretrainedConfig

from swarmtune.adapters.lora import ClientLora
from swarmtune.adapters.peft_format import load_adapter
from swarmtune.errors import UserError
from swarmtune.models.span import SpanModel
from swarmtune.server.lora import LoraSet

logger = logging.getLogger(__name__)


def parse_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH_OR_ID`` or ``PATH_OR_ID`` (named after its last path component) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = os.path.basename(os.path.normpath(spec)) if os.path.isdir(spec) else spec
    if not name or not path:
        raise UserError(f"--adapters: bad adapter spec {spec!r}: use NAME=PATH or PATH")
    return name, path


def read_hosted(specs: list[str], config: PretrainedConfig, revision: str | None = None) -> dict[str, ClientLora]:
    """Each hosted adapter's LoRA, read once: a server that moves applies it to whatever span it serves."""
    hosted = {}
    for spec in specs:
        name, path = parse_spec(spec)
        adapter = load_adapter(path, config, revision)
        if adapter.lora is None:
            raise ValueError(f"adapter {path} has no LoRA weights to host")
        if adapter.soft_prompts is not None or adapter.lm_head is not None:
            logger.warning(f"adapter {name}: servers apply its LoRA only; its soft prompts and LM head stay with "
                           f"clients, which load them with adapter={path}")
        hosted[name] = adapter.lora
        logger.info(f"hosting adapter {name} ({len(adapter.lora.keys)} layers)")
    return hosted


def hosted_for(adapters: dict[str, ClientLora], span: SpanModel, slots: dict[str, tuple[int, int]],
               have: dict[str, LoraSet]) -> dict[str, LoraSet]:
    """The LoRA weights of each adapter for the blocks of `span`, on its device and in its compute dtype.

    Weights already in `have` (those of the span served until now) are reused, not copied again:
    a server growing its span block by block copies each block's weights once.
    """
    device = next(span.parameters()).device
    hosted = {}
    for name, lora in adapters.items():
        keys = lora.keys_in(span.start, span.end)
        missing = [k for k in keys if k not in slots]
        if missing:
            raise ValueError(f"adapter {name} targets layers this server does not wrap: {missing[:3]}")
        old = have[name].weights if name in have else {}
        weights = {k: old.get(k) or tuple(t.detach().to(device, span.compute_dtype) for t in lora.pair(k))
                   for k in keys}
        hosted[name] = LoraSet(weights, lora.scale)
    return hosted
