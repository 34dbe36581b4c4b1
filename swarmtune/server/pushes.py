"""Chained inference steps: a server's output pushed straight to the next server of the session's chain, and
the pushes it takes for its own sessions, each only with the push key that session's client gave this hop."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import torch

from swarmtune import transport, wire
from swarmtune.security import Membership
from swarmtune.server.mailbox import Mailbox
from swarmtune.server.requests import Limits, RequestError, check_hidden, get_int, need

logger = logging.getLogger(__name__)
PUSH_TIMEOUT = 10.0


class Pushes:
    """Mailboxes of this server's sessions, by session id, and the pushes it sends on."""

    def __init__(self, hidden_size: int, limits: Limits, membership: Membership, stats: defaultdict):
        self.hidden_size, self.limits, self.membership, self.stats = hidden_size, limits, membership, stats
        self.mailboxes: dict[str, Mailbox] = {}
        self.p2p = None  # set once the server's handlers are added

    async def accept(self, meta: dict, tensors: dict, peer: str) -> bytes:
        """The previous server of a chain delivers its output for one step of one of our sessions."""
        mailbox = self.mailboxes.get(meta.get("session"))
        need(mailbox is not None, "push for an unknown session")
        if not mailbox.admits(meta.get("key")):
            self.stats["pushes_refused"] += 1
            raise RequestError("push refused: it lacks the push key the session's client gave this hop")
        step = get_int(meta, "step", 0, 2**31)
        mailbox.put(step, check_hidden(tensors.get("hidden"), "hidden", self.hidden_size, self.limits))
        self.stats["pushes_received"] += 1
        return wire.pack({"ok": True})

    def send_on(self, target: object, step: object, hidden: torch.Tensor) -> None:
        """Push a step's output to the next server, if the step asked for it (`push_to`) in a usable form."""
        if (isinstance(target, dict) and isinstance(target.get("peer"), str) and isinstance(target.get("key"), str)
                and isinstance(step, int)):
            asyncio.create_task(self._push(target, step, hidden))

    async def _push(self, target: dict, step: int, hidden: torch.Tensor) -> None:
        """Send our output to the next server of the chain; if this fails, the client sends it instead."""
        try:
            data = wire.pack({"session": target["session"], "key": target["key"], "step": step}, {"hidden": hidden})
            token = self.membership.token(str(self.p2p.peer_id))
            await transport.call(self.p2p, target["peer"], "push", data, timeout=PUSH_TIMEOUT, token=token)
        except Exception as e:
            logger.debug(f"push to {target.get('peer')} failed: {e}")


def push_key(meta: dict) -> str | None:
    value = meta.get("push_key")
    need(value is None or isinstance(value, str) and 16 <= len(value) <= 64,
         "'push_key' must be a string of 16 to 64 characters")
    return value
