"""Experiment loggers by config: wandb (online only when it can be, never blocking), csv, tensorboard."""

from __future__ import annotations

import netrc
import os
import socket
import sys
import threading

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from swarmtune.errors import UserError

WANDB_HOST = "api.wandb.ai"


def build_logger(cfg: dict, save_dir: str, name: str | None = None, group: str | None = None,
                 tags: list[str] | None = None) -> Logger | None:
    kind = cfg["kind"]
    if kind == "wandb":
        import wandb

        mode = wandb_mode(cfg.get("mode", "auto"))
        settings = wandb.Settings(init_timeout=cfg.get("init_timeout", 60))
        logger = WandbLogger(project=cfg.get("project", "swarmtune"), entity=cfg.get("entity"), name=name,
                             group=group, tags=tags, save_dir=save_dir, mode=mode, settings=settings)
        # Lightning passes anonymous=None, which wandb (0.19+) warns of as a setting that "has no effect"
        logger._wandb_init.pop("anonymous", None)
        return logger
    if kind == "csv":
        return CSVLogger(save_dir, name="csv", version="")
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir, name="tensorboard", version="")
    if kind == "none":
        return None
    raise UserError(f"logger.kind {kind!r} is unknown: use wandb, csv, tensorboard or none")


def wandb_mode(mode: str) -> str:
    """`auto`: online when credentials exist and wandb's API answers within seconds, else offline.

    An explicit WANDB_MODE in the environment wins, so tests and CI can force offline runs.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    if _has_credentials() and _reachable(WANDB_HOST, 443, timeout=3.0):
        return "online"
    print("wandb: no credentials or no network; logging offline (sync later with `wandb sync`)", file=sys.stderr)
    return "offline"


def finish(logger: Logger | None) -> None:
    """Close a wandb run (Lightning leaves it open), so the next job of a multirun starts its own."""
    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, port: int, timeout: float) -> bool:
    """A TCP connect bounded in time, name resolution included (it has no timeout of its own)."""
    done, ok = threading.Event(), []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass
        finally:
            done.set()

    threading.Thread(target=probe, daemon=True).start()
    done.wait(timeout)
    return bool(ok)
