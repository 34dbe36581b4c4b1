"""A fork server: one process imports a server's and a DHT peer's modules once, then forks each swarm process.

Why: `python -m swarmtune.server` spends ~6.5 s of CPU importing torch, transformers and hivemind before it
does anything, and the bootstrap `python -m swarmtune.dht` ~2.5 s; a test session started about a hundred of
them. A forked child runs the very module `python -m` would (its `__main__`, with the same argv and
environment) as a process of its own: its own PID and session, its own p2pd, its stdout a pipe to its owner;
it is signalled, suspended and killed by PID as before. Nothing runs in the fork server but imports (no torch
op, no thread of its own), as before PyTorch's DataLoader forks its workers.

`ForkServer` is the owner's side; `python -m swarmtune.forkserver` the server's. Requests and replies travel
on a SEQPACKET socket pair: a request carries the child's stdout as a file descriptor.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading

MODULES = ("swarmtune.server", "swarmtune.dht")  # what it can start (and imports first)
REPLY_TIMEOUT = 300.0  # its first reply waits for its imports, which take minutes on loaded cores


class ForkServerFailed(RuntimeError):
    pass


class Forked:
    """The part of `subprocess.Popen` that LocalSwarm's ManagedProcess uses, for a child of a fork server."""

    def __init__(self, server: ForkServer, pid: int, stdout):
        self.server, self.pid, self.stdout = server, pid, stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.poll() is None and not self.server.wait_exit(self.pid, timeout):
            raise subprocess.TimeoutExpired(f"forked process {self.pid}", timeout)
        return self.poll()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # as Popen: never signal a PID whose process is known gone
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """A running fork server and the exits of its children; `spawn` starts one."""

    def __init__(self, env: dict, log_path: str):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "swarmtune.forkserver", str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        theirs.close()
        self.env, self.log_path, self.sock = env, log_path, ours
        self._exits: dict[int, int] = {}
        self._pids: list[int | None] = []
        self._changed = threading.Condition()
        self._closed = False
        self._spawning = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self.sock.recv(256).decode()
            except OSError:
                message = ""
            with self._changed:
                if not message:  # it exited (or we closed the socket)
                    self._closed = True
                    self._changed.notify_all()
                    return
                kind, *numbers = message.split()
                if kind == "pid":
                    self._pids.append(int(numbers[0]))
                elif kind == "exit":
                    self._exits[int(numbers[0])] = int(numbers[1])
                self._changed.notify_all()

    @property
    def alive(self) -> bool:
        return not self._closed and self.proc.poll() is None

    def spawn(self, module: str, args: list[str], env: dict) -> Forked:
        """Fork `python -m MODULE ARGS` with environment `env`; its stdout and stderr come back as one text pipe."""
        if module not in MODULES:
            raise ValueError(f"the fork server starts {MODULES}, not {module}")
        read_end, write_end = os.pipe()
        try:
            with self._spawning, self._changed:
                wanted = len(self._pids) + 1
                request = json.dumps({"module": module, "args": args, "env": env}).encode()
                socket.send_fds(self.sock, [request], [write_end])
                if not self._changed.wait_for(lambda: len(self._pids) >= wanted or self._closed, REPLY_TIMEOUT):
                    raise ForkServerFailed(f"the fork server did not fork within {REPLY_TIMEOUT:.0f} s")
                if len(self._pids) < wanted:
                    raise ForkServerFailed(f"the fork server exited:\n{self._log_tail()}")
                pid = self._pids[wanted - 1]
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        return Forked(self, pid, os.fdopen(read_end, "r", errors="replace"))

    def exit_code(self, pid: int) -> int | None:
        with self._changed:
            if pid in self._exits:
                return self._exits[pid]
            if self._closed and not _exists(pid):  # it exited unreaped by the fork server, which is gone
                return -signal.SIGKILL
            return None

    def wait_exit(self, pid: int, timeout: float | None) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: pid in self._exits or self._closed and not _exists(pid), timeout)

    def close(self) -> None:
        """Stop the fork server (its children are their owners' to stop)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(timeout=5)
        self.sock.close()

    def _log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return f.read()[-n:]
        return ""


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- the fork server's side ------------------------------------------------------------------------------


def _become(request: dict, stdout_fd: int, sock: socket.socket) -> None:
    """In the child: become `python -m MODULE ARGS` (never returns to the fork server's loop)."""
    import runpy

    sock.close()
    os.setsid()
    os.dup2(stdout_fd, 1)
    os.dup2(stdout_fd, 2)
    os.close(stdout_fd)
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["module"], *request["args"]]
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    sys.exit(0)  # returned without exiting: end as `python -m` would, not in the fork server's loop


def _status(status: int) -> int:
    """A wait status as Popen's returncode: the exit code, or minus the signal that ended it."""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(f"exit {pid} {_status(status)}".encode())


def serve(fd: int) -> None:
    """Import what the children share, then fork one child per request until the owner hangs up."""
    import importlib

    for module in MODULES:
        main = f"{module}.__main__" if module == "swarmtune.server" else module
        importlib.import_module(main)
        del sys.modules[main]  # its imports stay; the module itself a child runs afresh, as `-m` would
    sock = socket.socket(fileno=fd)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    while True:
        ready = selector.select(timeout=0.1)
        _reap(sock)
        if not ready:
            continue
        message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 1)
        if not message:  # the owner hung up (or died): the children live on, theirs to stop
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            selector.close()
            _become(json.loads(message), fds[0], sock)
        os.close(fds[0])
        sock.send(f"pid {pid}".encode())


if __name__ == "__main__":
    serve(int(sys.argv[1]))
