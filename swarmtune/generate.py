"""python -m swarmtune.generate [adapter=DIR] prompt="..." [swarm.initial_peers=[...]]: generate through a swarm.

The text streams to stdout as it is generated. With no peers given it starts an embedded
LocalSwarm of the configured model (by default the tiny demo model, the one swarmtune.train
trains), so `python -m swarmtune.train` followed by
`python -m swarmtune.generate adapter=<the printed path>` works on a fresh machine.
"""

from __future__ import annotations

import contextlib

import hydra
from omegaconf import DictConfig, OmegaConf

from swarmtune.launch import config_path, open_model


def run(cfg: DictConfig) -> str:
    """Generate for `cfg.prompt`; returns the generated continuation."""
    import torch
    from transformers import TextStreamer

    torch.manual_seed(cfg.seed)
    with contextlib.ExitStack() as stack:
        model, tokenizer = open_model(stack, cfg, log_dir=None, adapter=cfg.adapter,
                                      active_adapter=cfg.active_adapter)
        inputs = tokenizer([cfg.prompt], return_tensors="pt")
        print(cfg.prompt, end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True)
        out = model.generate(**inputs, streamer=streamer, **OmegaConf.to_container(cfg.generation, resolve=True))
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@hydra.main(config_path=config_path(), config_name="generate", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
