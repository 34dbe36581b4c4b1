"""A process forked by the fork server behaves as `python -m MODULE` would: output, exit status, session, signals."""

from __future__ import annotations

import os
import signal
import sys

import psutil
import pytest

from swarmtune.forkserver import ForkServer
from swarmtune.local_swarm import ManagedProcess, _env, _fork_server


@pytest.fixture(scope="module")
def fork_server() -> ForkServer:
    """The fork server the tests' swarms share (conftest turns forking on)."""
    return _fork_server([sys.executable, "-m", "swarmtune.server"], _env())


def test_a_forked_command_prints_and_exits_as_the_command_line_does(fork_server, tmp_path):
    forked = fork_server.spawn("swarmtune.server", ["--model", str(tmp_path), "--blocks", "2:1"], _env())
    printed = forked.stdout.read()
    assert forked.wait(120) == 2 and "--blocks 2:1: need 0 <= START < END" in printed, printed
    assert forked.poll() == 2


def test_a_forked_daemon_stops_on_sigterm_and_dies_of_sigkill(fork_server, tmp_path):
    daemons = [ManagedProcess([sys.executable, "-m", "swarmtune.dht"], str(tmp_path / f"dht{i}.log"), _env(),
                              fork=True) for i in range(2)]
    try:
        for daemon in daemons:
            assert daemon.wait_marker("MADDR", 120, "the DHT peer")[0].startswith("/ip4/127.0.0.1/")
            assert psutil.Process(daemon.pid).ppid() == fork_server.proc.pid  # forked, not started afresh
            assert os.getsid(daemon.pid) == daemon.pid  # a session of its own, as start_new_session gives
            assert not any("Warning" in line for line in daemon.lines), daemon.tail()
        assert daemons[0].stop() == 0
        daemons[1].kill()
        assert daemons[1].proc.returncode == -signal.SIGKILL
    finally:
        for daemon in daemons:
            daemon.stop()


def test_only_the_swarms_modules_are_forked(fork_server):
    with pytest.raises(ValueError):
        fork_server.spawn("swarmtune.train", [], _env())
