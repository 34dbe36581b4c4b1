"""python -m swarmtune.swarm up|down|status: a swarm on this machine that outlives commands, and what a swarm serves."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time

import psutil

from swarmtune import errors, launch, shutdown, status
from swarmtune.atomic import write_atomic
from swarmtune.errors import UserError
from swarmtune.local_swarm import LocalSwarm, find_running, record_path, running_swarms


def up(overrides: list[str]) -> None:
    """Serve the configured model (as train, generate and eval would embed it) until stopped, and record it,
    so that those commands use it instead of starting their own."""
    launch.check_overrides("local_swarm", overrides)
    with launch.composed("local_swarm", overrides) as cfg:
        model = launch.resolve_model(cfg.model)
        spans = launch.local_spans(cfg.swarm.local_spans, launch.num_blocks(launch.model_config(cfg.model, model)))
    if find_running(model) is not None:
        raise UserError(f"a swarm for {model} is up already: stop it with python -m swarmtune.swarm down")
    log_dir = tempfile.mkdtemp(prefix="swarmtune-up-")
    with LocalSwarm(model, spans=spans, log_dir=log_dir) as swarm:
        record = {"model": os.path.realpath(model), "initial_peers": swarm.initial_peers,
                  "dht_prefix": swarm.dht_prefix, "pid": os.getpid(), "log_dir": log_dir,
                  "spans": [list(s.span) for s in swarm.servers]}
        path = record_path(model)
        write_atomic(path, json.dumps(record, indent=2).encode())
        try:
            print(f"Swarm up: {len(swarm.servers)} servers of {model} (logs in {log_dir})\n"
                  f"initial peers: {' '.join(swarm.initial_peers)}\n"
                  f"train, generate and eval without swarm.initial_peers use it; stop it with Ctrl-C or "
                  f"python -m swarmtune.swarm down", flush=True)
            while not any(server.proc.poll() is not None for server in swarm.servers):
                time.sleep(1.0)
            raise UserError(f"a server of the swarm exited; its log is in {log_dir}")
        except shutdown.Stopped:
            pass  # how `down` and Ctrl-C stop it: the swarm stops as the block ends
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)


def down(timeout: float = 30.0) -> list[dict]:
    """Stop every `swarm up` swarm (SIGTERM, waiting up to `timeout` for each); returns what was stopped."""
    stopped = running_swarms()
    for record in stopped:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(record["pid"])
            process.terminate()
            process.wait(timeout)
    return stopped


USAGE = """usage: python -m swarmtune.swarm COMMAND ...
  up [key=value ...]    serve the configured model (model.path=..., swarm.local_spans=...) on 127.0.0.1
                        until stopped; train, generate and eval without swarm.initial_peers use it
  down                  stop the swarms that `up` started
  status [--initial-peers MADDR ...] [--model NAME | --dht-prefix PREFIX]
                        what a swarm serves (without peers: the swarms `up` started)"""


def main(argv: list[str] | None = None) -> None:
    """python -m swarmtune.swarm up|down|status ...: a swarm on this machine, and what a swarm serves."""
    argv = sys.argv[1:] if argv is None else argv
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    debug = "--debug" in args
    with shutdown.stopped_by_signals(), errors.reported(debug, expected=launch_errors()):
        if command == "up":
            up([a for a in args if a != "--debug"])
        elif command == "down":
            stopped = down()
            print("\n".join(f"stopped the swarm of {r['model']} (pid {r['pid']})" for r in stopped)
                  or "no swarm is up", flush=True)
        elif command == "status":
            status.main(args)
        else:
            raise SystemExit(USAGE)


def launch_errors() -> tuple[type[BaseException], ...]:
    """Mistakes in `up`'s overrides, as Hydra and OmegaConf report them."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return HydraException, OmegaConfBaseException


if __name__ == "__main__":
    main()
