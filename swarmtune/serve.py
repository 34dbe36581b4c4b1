"""python -m swarmtune.serve [model.path=...] ['adapters={NAME: DIR}'] [port=8000]: an OpenAI-compatible endpoint.

Point the `openai` client (or LangChain, a chat UI, an evaluation harness) at
http://127.0.0.1:8000/v1; the swarm page is at http://127.0.0.1:8000/. Requests name the base
model or an adapter: those given in `adapters` travel to servers as client-owned LoRA, and
adapters that servers host are served by name. With no peers given it uses the swarm `swarm up`
keeps for the model, or starts an embedded LocalSwarm of it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

import hydra
from omegaconf import DictConfig

from swarmtune import errors
from swarmtune.errors import UserError
from swarmtune.launch import (
    client_settings,
    config_path,
    load_adapter,
    load_draft,
    model_config,
    open_model,
    plain,
    reported,
    resolve_model,
    run_hydra_app,
)


def build(stack: contextlib.ExitStack, cfg: DictConfig):
    """(app, engine) for `cfg`; `stack` stops the batchers, the model's connection and any embedded swarm."""
    adapters = plain(cfg.adapters) if isinstance(cfg.adapters, DictConfig) else cfg.adapters or {}
    if not isinstance(adapters, dict):
        example = adapters if isinstance(adapters, str) else "outputs/adapter"
        raise UserError(f"adapters must name each adapter: write 'adapters={{bees: {example}}}' (quoted for the "
                        "shell), and requests then ask for the model bees")
    for name, source in adapters.items():
        errors.check_source(str(source), f"adapters.{name}")
    for key in ("max_rows", "max_length"):
        if not (isinstance(cfg.batching[key], int) and cfg.batching[key] >= 1):
            raise UserError(f"batching.{key} must be an integer >= 1, got {cfg.batching[key]!r}")
    from swarmtune.api.limits import EndpointLimits

    try:
        limits = EndpointLimits(**plain(cfg.limits))
    except (TypeError, ValueError) as e:
        raise UserError(f"{e} (serve's limits: {', '.join(EndpointLimits.__dataclass_fields__)})") from None
    client_settings(cfg.swarm)
    from swarmtune.api.app import Engine, make_app
    from swarmtune.api.batching import Variant
    from swarmtune.api.swarm_page import swarm_router

    template = None
    if cfg.chat_template is not None:
        errors.check_file(cfg.chat_template, "chat_template")
        with open(cfg.chat_template) as f:
            template = f.read()
    model_path = resolve_model(cfg.model)
    name = cfg.name or public_name(cfg.model.path, model_path)
    if name in adapters:
        raise UserError(f"adapter name {name!r} is the base model's name: rename the adapter or set name=...")
    config = model_config(cfg.model, model_path)
    draft = load_draft(cfg.generation.draft, config, cfg.model.dtype)
    variants = {}
    for adapter_name, source in adapters.items():
        loaded = load_adapter(str(source), config, cfg.model.revision)
        prompts = loaded.soft_prompts
        if prompts is not None and prompts.deep is not None:
            raise UserError(f"adapters.{adapter_name} has deep prompts, which serve does not batch: "
                            "use python -m swarmtune.generate adapter=... for it")
        variants[adapter_name] = Variant(adapter_name, lora=loaded.lora.eval() if loaded.lora is not None else None,
                                         soft_prompts=prompts.eval() if prompts is not None else None,
                                         lm_head=loaded.lm_head)
    model, tokenizer = open_model(stack, cfg, log_dir=None)
    if template is not None:
        tokenizer.chat_template = template
    engine = Engine(model, tokenizer, name, variants, api_key=cfg.api_key, max_rows=cfg.batching.max_rows,
                    max_length=cfg.batching.max_length, draft=draft, limits=limits)
    stack.callback(engine.close)
    page = swarm_router(model.connection, name, refresh_s=cfg.page_refresh_s)
    return make_app(engine, extra_routers=(page,)), engine


def public_name(path: str | None, resolved: str) -> str:
    """The model's name for clients: a hub id as given, a local directory by its basename (no local path is served)."""
    if path and not os.path.exists(path):
        return path
    return os.path.basename(os.path.normpath(resolved))


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything slow starts (port 0: any free port)."""
    try:
        sock = socket.create_server((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): give another port=... or host=...") from None
    return sock


def run(cfg: DictConfig) -> None:
    import uvicorn

    from swarmtune.api.limits import uvicorn_config

    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(listen(cfg.host, cfg.port))
        app, engine = build(stack, cfg)
        host, port = sock.getsockname()[:2]
        print(f"Serving {engine.base_name} (and {len(engine.variants) - 1} adapter(s)) at "
              f"http://{host}:{port}/v1, swarm page at http://{host}:{port}/", file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn_config(app, engine.limits)).run(sockets=[sock])


@hydra.main(config_path=config_path(), config_name="serve", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    with reported():
        run(cfg)


def main() -> None:
    run_hydra_app(_hydra_main, "serve")


if __name__ == "__main__":
    main()
