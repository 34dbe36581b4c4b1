"""python -m swarmtune.generate [adapter=DIR] prompt="..." [swarm.initial_peers=[...]]: generate through a swarm.

The text streams to stdout as it is generated. With no peers given it uses the swarm that
`python -m swarmtune.swarm up` keeps running for the configured model, or else starts an embedded
LocalSwarm of it (by default the tiny demo model, the one swarmtune.train trains), so
`python -m swarmtune.train` followed by `python -m swarmtune.generate adapter=<the printed path>`
works on a fresh machine.
"""

from __future__ import annotations

import contextlib

import hydra
from omegaconf import DictConfig

from swarmtune.errors import UserError
from swarmtune.launch import (
    client_settings,
    config_path,
    load_draft,
    model_config,
    open_model,
    plain,
    reported,
    resolve_model,
    run_hydra_app,
)


def run(cfg: DictConfig) -> str:
    """Generate for `cfg.prompt`; returns the generated continuation."""
    client_settings(cfg.swarm)
    import torch

    generation = generation_kwargs(cfg.generation)
    draft = generation.pop("draft", None)
    if draft is not None:
        if generation.get("num_beams", 1) > 1:
            raise UserError("generation.draft (speculative decoding) works with num_beams=1")
        generation["assistant_model"] = load_draft(draft, model_config(cfg.model, resolve_model(cfg.model)),
                                                   cfg.model.dtype)
    torch.manual_seed(cfg.seed)
    with contextlib.ExitStack() as stack:
        model, tokenizer = open_model(stack, cfg, log_dir=None, adapter=cfg.adapter,
                                      active_adapter=cfg.active_adapter)
        inputs = tokenizer([cfg.prompt], return_tensors="pt")
        print(cfg.prompt, end="", flush=True)
        out = model.generate(**inputs, streamer=text_streamer(tokenizer), **generation)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def text_streamer(tokenizer):
    """Prints the continuation as it comes, as the returned text reads: without special tokens (a trained adapter
    ends its answer with `</s>`)."""
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generation_kwargs(node: DictConfig) -> dict:
    """`generation` as keyword arguments of transformers' generate() (and `draft`), checked before anything starts."""
    from transformers import GenerationConfig

    kwargs = plain(node)
    known = GenerationConfig()
    unknown = sorted(k for k in kwargs if not hasattr(known, k) and k != "draft")
    if unknown:
        raise UserError(f"generation.{unknown[0]} is not an argument of transformers' generate()")
    limits = {"max_new_tokens": 1, "num_beams": 1, "top_k": 0}
    for key, low in limits.items():
        if key in kwargs and not (isinstance(kwargs[key], int) and kwargs[key] >= low):
            raise UserError(f"generation.{key} must be an integer >= {low}, got {kwargs[key]!r}")
    for key in ("temperature", "repetition_penalty", "top_p"):
        if key in kwargs and not (isinstance(kwargs[key], (int, float)) and kwargs[key] > 0):
            raise UserError(f"generation.{key} must be a positive number, got {kwargs[key]!r}")
    return kwargs


@hydra.main(config_path=config_path(), config_name="generate", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    with reported():
        run(cfg)


def main() -> None:
    run_hydra_app(_hydra_main, "generate")


if __name__ == "__main__":
    main()
