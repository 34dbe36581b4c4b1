"""Mistakes a user can fix, and how every command reports them: one or two lines naming the problem
and what to do, found before any slow work where it can be, with the full traceback only on request
(`--debug`, or HYDRA_FULL_ERROR=1 for the Hydra entry points)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterable, Iterator

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
MADDR_EXAMPLE = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."


class UserError(Exception):
    """A problem the user can fix (a path, an address, a config value, a swarm without servers for some
    blocks); the message names it and says what to do."""


def check_source(source: str, what: str, files: bool = False) -> None:
    """A model, adapter (or with `files`, data set): an existing directory (or file), or something shaped
    like a hub id (``org/name``)."""
    if os.path.isdir(source) or files and os.path.isfile(source):
        return
    if os.path.exists(source):
        raise UserError(f"{what} {source} is a file: give the directory that holds it")
    if not HUB_ID.fullmatch(source) or ".." in source or "--" in source:
        raise UserError(f"{what} {source}: no such directory, and not a hub id (org/name) either: check the path")


def check_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"{what} {path}: no such file")


def check_multiaddrs(addrs: Iterable[str], what: str, peer_id: bool = True) -> None:
    """Each a multiaddr, ending (with `peer_id`) in the /p2p/ID of the peer, as libp2p needs to dial it."""
    addrs = list(addrs)
    if not addrs:
        return  # without importing hivemind (and torch with it): seconds, on a busy machine
    from hivemind.utils.multiaddr import Multiaddr

    for addr in addrs:
        try:
            protocols = {p.name for p in Multiaddr(addr).protocols()}
        except Exception as e:
            raise UserError(f"{what}: {addr!r} is not a multiaddr ({e}); expected e.g. {MADDR_EXAMPLE}") from None
        if peer_id and "p2p" not in protocols:
            raise UserError(f"{what}: {addr} lacks the peer id: add /p2p/ID, e.g. {MADDR_EXAMPLE}")


def check_positive(config, name: str, optional: bool = False) -> None:
    """For a config's `__post_init__`: `config.name` must be a positive number (or None, if `optional`)."""
    value = getattr(config, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def full_tracebacks() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextlib.contextmanager
def reported(debug: bool = False, expected: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """UserError (and the `expected` kinds) as one line on stderr and exit status 2, unless `debug`."""
    try:
        yield
    except (UserError, *expected) as e:
        if debug or full_tracebacks():
            raise
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print("error: " + "\n".join(lines if isinstance(e, UserError) else lines[:2]), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
