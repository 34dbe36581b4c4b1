"""`python -m swarmtune.swarm up`: one local swarm that generate, eval and status use instead of their own."""

from __future__ import annotations

import os
import sys
import time

import psutil

from swarmtune.local_swarm import ManagedProcess
from tests.helpers import run


def wait_for_line(process: ManagedProcess, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in process.lines):
        assert process.proc.poll() is None, process.tail()
        assert time.monotonic() < deadline, f"no {text!r} within {timeout:.0f} s:\n{process.tail()}"
        time.sleep(0.2)


def test_generate_and_status_use_the_swarm_that_is_up(tmp_path, tiny_llama):
    env = {**os.environ, "SWARMTUNE_CACHE": str(tmp_path / "home")}
    up = ManagedProcess([sys.executable, "-m", "swarmtune.swarm", "up", f"model.path={tiny_llama}",
                         "swarm.local_spans=[[0,3],[3,6]]"], str(tmp_path / "up.log"), env)
    try:
        wait_for_line(up, "initial peers:", timeout=180)
        servers = [p for p in psutil.Process(up.pid).children(recursive=True)
                   if "swarmtune.server" in " ".join(p.cmdline())]
        assert len(servers) == 2

        generated = run("swarmtune.generate", f"model.path={tiny_llama}", "prompt=Question: what do bees make?",
                        "generation.max_new_tokens=4", f"hydra.run.dir={tmp_path / 'gen'}", env=env)
        assert generated.returncode == 0, generated.stderr[-3000:]
        assert "Using the swarm that `python -m swarmtune.swarm up` runs" in generated.stderr
        assert not generated.started_swarm and generated.stdout.startswith("Question: what do bees make?")

        status = run("swarmtune.swarm", "status", env=env)  # no peers given: the swarm that is up
        assert status.returncode == 0, status.stdout + status.stderr
        assert "1 model(s) announced" in status.stdout and "6 blocks, 2 of 2 servers online" in status.stdout

        again = run("swarmtune.swarm", "up", f"model.path={tiny_llama}", env=env)
        assert again.returncode == 2 and "is up already" in again.stderr and not again.started_swarm

        down = run("swarmtune.swarm", "down", env=env, timeout=60)
        assert down.returncode == 0 and "stopped the swarm of" in down.stdout, down.stdout + down.stderr
        up.proc.wait(30)
        assert up.proc.returncode == 0, up.tail()
        assert not [p for p in servers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not os.listdir(tmp_path / "home" / "swarms")  # its record went with it
        assert "no swarm is up" in run("swarmtune.swarm", "down", env=env).stdout
    finally:
        up.stop()
