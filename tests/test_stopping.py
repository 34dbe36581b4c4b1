"""Every command that starts a swarm stops it on SIGTERM and SIGINT, during its startup and after it: no DHT,
server or p2pd process of it is left. Each process a test starts carries a tag in its environment, which its
children (servers, their p2pd daemons) inherit: what is left is found by that tag, orphans included.

With no swarm.local_spans, the embedded swarm splits the model's blocks over its servers: `serve` with a
4-block model serves it (the default spans were the 6-block demo model's)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from swarmtune.local_swarm import ManagedProcess

TAG = "SWARMTUNE_TEST_TAG"


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes carrying `tag` in their environment."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get(TAG) == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def swarm_children(process: ManagedProcess) -> list[str]:
    """The command lines of the swarm processes below `process`."""
    with contextlib.suppress(psutil.Error):
        return [" ".join(p.cmdline()) for p in psutil.Process(process.pid).children(recursive=True)]
    return []


def started_server(process: ManagedProcess) -> bool:
    return any("swarmtune.server" in cmd for cmd in swarm_children(process))


def connected(process: ManagedProcess) -> bool:
    """Past startup: the swarm's three servers and the command's own client each have their p2pd (and the DHT)."""
    return sum("p2pd" in cmd for cmd in swarm_children(process)) >= 5


def printed(text: str) -> Callable[[ManagedProcess], bool]:
    return lambda process: any(text in line for line in process.lines)


def stop_with(signum: int, module: str, args: list[str], ready: Callable[[ManagedProcess], bool], tmp_path: Path,
              timeout: float = 240) -> int:
    """Start `python -m module args`, send `signum` once `ready(process)`, and check that it exits and leaves no
    process behind; returns its exit status."""
    tag = uuid.uuid4().hex
    env = {**os.environ, TAG: tag, "SWARMTUNE_CACHE": str(tmp_path / "home")}
    process = ManagedProcess([sys.executable, "-m", module, *args], str(tmp_path / "command.log"), env)
    try:
        deadline = time.monotonic() + timeout
        while not ready(process):
            assert process.proc.poll() is None, f"it exited before the signal:\n{process.tail()}"
            assert time.monotonic() < deadline, f"not ready within {timeout:.0f} s:\n{process.tail()}"
            time.sleep(0.05)
        below = swarm_children(process)
        os.kill(process.pid, signum)
        code = process.proc.wait(60)
        deadline = time.monotonic() + 30  # a daemon told to stop may take a moment to go (more on busy cores)
        while (left := tagged(tag)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, (below, [" ".join(p.cmdline()) for p in left], process.tail())
        assert code == 128 + signum or code == 0 and module == "swarmtune.swarm", (code, process.tail())
        assert "Traceback" not in "\n".join(process.lines), process.tail()
        return code
    finally:
        for p in tagged(tag):
            with contextlib.suppress(psutil.Error):
                p.kill()
        process.stop()


def test_train_stops_its_swarm_on_sigterm_during_startup(tmp_path, tiny_llama):
    stop_with(signal.SIGTERM, "swarmtune.train", [f"model.path={tiny_llama}", "logger=none",
                                                  f"hydra.run.dir={tmp_path}/run"], started_server, tmp_path)


def test_serve_splits_a_4_block_model_and_stops_on_sigterm(tmp_path, tiny_models):
    """Its embedded swarm, with no local_spans given, serves a 4-block model; SIGTERM then stops all of it."""
    model = tiny_models("llama", layers=4)
    ready = printed("Serving ")
    asked = {"done": False}

    def served(process: ManagedProcess) -> bool:
        if not ready(process):
            return False
        if not asked["done"]:
            line = next(line for line in process.lines if line.startswith("Serving "))
            url = line.split(" at ", 1)[1].split(" ", 1)[0].rstrip(",")
            reply = httpx.post(f"{url}/completions", json={"model": os.path.basename(model), "prompt": "Bees",
                                                                  "max_tokens": 4},
                               timeout=60)
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 4
            asked["done"] = True
        return True

    stop_with(signal.SIGTERM, "swarmtune.serve", [f"model.path={model}", "port=0", f"hydra.run.dir={tmp_path}/run"],
              served, tmp_path)


COMMANDS = {  # what to run, and when it is past its startup
    "serve": (["port=0"], printed("Serving ")),
    "swarm": (["up"], printed("initial peers:")),
    "train": (["logger=none", "trainer.log_every_n_steps=1", "trainer.max_steps=1000"], printed("step 1/")),
    "generate": (["generation.max_new_tokens=1000"], connected),
    "eval": (["split=train"], connected),
}


@pytest.mark.slow
@pytest.mark.parametrize("when", ["during startup", "after startup"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_entry_point_stops_its_swarm(command, signum, when, tmp_path, tiny_llama):
    args, after = COMMANDS[command]
    args = [*args, f"model.path={tiny_llama}"]
    if command != "swarm":
        args.append(f"hydra.run.dir={tmp_path}/run")
    stop_with(signum, f"swarmtune.{command}", args, started_server if when == "during startup" else after, tmp_path)
