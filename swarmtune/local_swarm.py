"""LocalSwarm: a bootstrap peer and one server process per span, all on 127.0.0.1.

Used by tests, benchmarks and the embedded default of the entry points. Every process it starts
is stopped when the context exits; every wait has a timeout and fails with the process's log.
The swarms that `python -m swarmtune.swarm up` keeps running are recorded here, so that the
entry points find them.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import psutil

from swarmtune import records, shutdown


class ProcessFailed(RuntimeError):
    pass


class ManagedProcess:
    """A child process whose stdout is logged to a file and scanned for marker lines."""

    def __init__(self, args: list[str], log_path: str, env: dict | None = None):
        self.log_path = log_path
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.markers: dict[str, list[str]] = collections.defaultdict(list)
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        with open(self.log_path, "a") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                with self._changed:
                    self.lines.append(line.rstrip())
                    word = line.split(" ", 1)[0]
                    if word.isupper():
                        self.markers[word].append(line.rstrip().split(" ", 1)[-1])
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_marker(self, marker: str, timeout: float, what: str) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self.markers.get(marker):
                if self.proc.poll() is not None:
                    raise ProcessFailed(f"{what} exited with code {self.proc.returncode}:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProcessFailed(f"{what} did not start within {timeout:.0f} s:\n{self.tail()}")
                self._changed.wait(min(left, 0.5))
            return list(self.markers[marker])

    def tail(self, n: int = 40) -> str:
        return "\n".join(list(self.lines)[-n:])

    def _family(self) -> list[psutil.Process]:
        try:
            parent = psutil.Process(self.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the process and everything it started (its p2pd): as if its machine died."""
        for p in self._family():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self._reap()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL whatever is left after `timeout`."""
        family = self._family()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        _, alive = psutil.wait_procs([p for p in family if p.is_running()], timeout=3)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self._reap()
        return self.proc.returncode

    def suspend(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def _reap(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._reader.join(timeout=5)


class ServerProcess(ManagedProcess):
    def __init__(self, span: tuple[int, int] | None, args: list[str], log_path: str, env: dict | None = None):
        super().__init__(args, log_path, env)
        self.span = span
        self.peer_id: str | None = None
        self.maddrs: list[str] = []


class LocalSwarm:
    """``with LocalSwarm(model, spans=[(0, 4), (4, 8)]) as swarm: ...`` starts, then stops, a loopback swarm.

    `server_options` become command-line options of every server (``cache_mb=64`` ->
    ``--cache-mb 64``; ``True`` -> a bare flag); `per_server` gives extra options per span. A span
    of None lets that server choose its own (give ``num_blocks=N`` or ``num_blocks="auto"``, which
    servers with a span ignore); its `.span` is what it first announced. ``host`` (default
    127.0.0.1) is where the bootstrap and the servers listen; a server's own ``host`` and ``wrap``
    (a command prefix such as ``["ip", "netns", "exec", NS]``) place it elsewhere, as the
    network-emulation benchmarks do.
    `dht_options` become options of the bootstrap peer (e.g. ``swarm_key=PATH`` for a private swarm).
    """

    def __init__(self, model: str, spans: Sequence[tuple[int, int] | None], dht_prefix: str | None = None,
                 start_timeout: float = 180.0, log_dir: str | None = None,
                 per_server: Sequence[dict] | None = None, dht_options: dict | None = None, **server_options):
        self.model, self.spans = model, [None if s is None else tuple(s) for s in spans]
        self.dht_prefix = dht_prefix or records.dht_prefix(model)
        self.start_timeout = start_timeout
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="swarmtune-swarm-")
        os.makedirs(self.log_dir, exist_ok=True)
        self.per_server = list(per_server) if per_server else [{} for _ in self.spans]
        self.server_options = {"num_threads": 1, "update_period": 5.0, "expiration": 15.0, **server_options}
        self.dht_options = dict(dht_options or {})
        self.bootstrap: ManagedProcess | None = None
        self.servers: list[ServerProcess] = []
        self.initial_peers: list[str] = []

    def __enter__(self) -> LocalSwarm:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        args = [sys.executable, "-m", "swarmtune.dht", "--host", self.server_options.get("host", "127.0.0.1"),
                *_flags(self.dht_options)]
        with shutdown.held():  # a signal now would stop us before close() knows of the process
            self.bootstrap = ManagedProcess(args, os.path.join(self.log_dir, "dht.log"), _env())
        self.initial_peers = self.bootstrap.wait_marker("MADDR", self.start_timeout, "the bootstrap DHT peer")
        pending = [self._launch(span, extra) for span, extra in zip(self.spans, self.per_server)]
        for server in pending:
            self._wait_ready(server)

    def add_server(self, span: tuple[int, int] | None, wait: bool = True, **options) -> ServerProcess:
        server = self._launch(None if span is None else tuple(span), options)
        if wait:
            self._wait_ready(server)
        return server

    def _launch(self, span: tuple[int, int] | None, extra: dict) -> ServerProcess:
        options = {"host": "127.0.0.1", **self.server_options, **extra}
        args = [*options.pop("wrap", ()), sys.executable, "-m", "swarmtune.server", "--model", self.model,
                "--dht-prefix", self.dht_prefix, "--initial-peers", *self.initial_peers]
        if span is not None:
            args += ["--blocks", f"{span[0]}:{span[1]}"]
            options.pop("num_blocks", None)  # meant for the servers choosing their span
        args += _flags(options)
        log = os.path.join(self.log_dir, f"server-{len(self.servers)}-{span[0]}-{span[1]}.log" if span
                           else f"server-{len(self.servers)}.log")
        with shutdown.held():
            server = ServerProcess(span, args, log, _env())
            self.servers.append(server)
        return server

    def _wait_ready(self, server: ServerProcess) -> None:
        what = f"server for blocks {server.span[0]}:{server.span[1]}" if server.span else "server choosing its blocks"
        line = server.wait_marker("SERVING", self.start_timeout, what)
        server.peer_id = line[0].rsplit(" ", 1)[-1]
        if server.span is None:  # "blocks A:B of MODEL as PEER"
            server.span = tuple(int(x) for x in line[0].split(" ", 2)[1].split(":"))
        server.maddrs = server.markers.get("MADDR", [])

    def close(self) -> None:
        running = [s for s in self.servers if s.proc.poll() is None]
        for server in running:  # signal all first, so they shut down in parallel
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGCONT)  # a suspended server cannot handle SIGTERM
                os.kill(server.pid, signal.SIGTERM)
        for server in self.servers:
            server.stop()
        if self.bootstrap is not None:
            self.bootstrap.stop()


def _flags(options: dict) -> list[str]:
    """Command-line flags from keyword options: ``cache_mb=64`` -> ``--cache-mb 64``, True -> a bare flag."""
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---- the records of `python -m swarmtune.swarm up` swarms, which outlive commands -------------------


def registry_dir() -> str:
    """Where running `swarm up` swarms are recorded (beside the tiny demo models)."""
    return os.path.join(os.path.expanduser(os.environ.get("SWARMTUNE_CACHE", "~/.cache/swarmtune")), "swarms")


def record_path(model: str) -> str:
    key = hashlib.sha256(os.path.realpath(model).encode()).hexdigest()[:16]
    return os.path.join(registry_dir(), f"{key}.json")


def running_swarms() -> list[dict]:
    """The `swarm up` swarms alive now: what each recorded (model, initial_peers, dht_prefix, pid)."""
    found = []
    for name in sorted(os.listdir(registry_dir())) if os.path.isdir(registry_dir()) else []:
        path = os.path.join(registry_dir(), name)
        try:
            with open(path) as f:
                record = json.load(f)
            alive = "swarmtune.swarm" in " ".join(psutil.Process(record["pid"]).cmdline())
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            alive = False
        if alive:
            found.append(record)
        else:  # its process is gone (killed, or the machine restarted): forget it
            with contextlib.suppress(OSError):
                os.remove(path)
    return found


def find_running(model: str) -> dict | None:
    """The running `swarm up` swarm of this checkpoint, if any."""
    here = os.path.realpath(model)
    return next((r for r in running_swarms() if r["model"] == here), None)
