"""SIGTERM stops a command as Ctrl-C does: `with` blocks unwind, and every process it started is stopped.

The processes of a LocalSwarm run in sessions of their own (so that a terminal's Ctrl-C reaches the
command, which then stops its servers in order), so nothing but the command itself can stop them:
it must not die of a signal before it has. `stopped_by_signals()` wraps an entry point: SIGTERM and
SIGINT raise `Stopped` in the main thread, once (a second signal during the cleanup is ignored, not
cut short), and the command exits with status 128 + the signal's number.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import NoReturn

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived; a KeyboardInterrupt, so that code that stops cleanly on Ctrl-C (Lightning's
    trainer) does the same here."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_state = {"held": 0, "pending": None, "stopping": None}


def _handle(signum: int, frame) -> None:
    if _state["stopping"] is not None:
        return  # already stopping: let the cleanup finish
    if _state["held"]:
        _state["pending"] = signum
        return
    _state["stopping"] = signum
    raise Stopped(signum)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A signal that arrives inside waits for the block to end: e.g. between starting a process and recording
    it where the cleanup finds it."""
    _state["held"] += 1
    try:
        yield
    finally:
        _state["held"] -= 1
        pending = _state["pending"]
        if not _state["held"] and pending is not None:
            _state["pending"] = None
            _handle(pending, None)


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """Run an entry point so that SIGTERM and SIGINT unwind it; exits 128 + the signal's number when one came."""
    previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS}
    try:
        yield
    except (Stopped, SystemExit):
        signum = _state["stopping"]
        if signum is None:  # an exit of the command's own
            raise
        # (a SystemExit here: Lightning's trainer turns a KeyboardInterrupt into an exit of its own)
        print(f"Stopped by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state.update(held=0, pending=None, stopping=None)


def exit_at_once() -> NoReturn:
    """End a daemon (a server, a DHT peer) that has shut itself down: announcement withdrawn, p2pd stopped, files
    closed. Python's own teardown, collecting torch's and transformers' objects one by one, would add seconds to
    every stop (6 s of a 6.3 s stop on a loaded 2-core machine) for nothing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
