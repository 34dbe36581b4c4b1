"""The compute threads of a server: two lanes, each fed fairly across peers and, within a peer, by priority.

Blocks share one device; running requests one at a time per lane keeps memory predictable. A request
cannot be paused once it runs, so short requests (cost up to SHORT_COST: decoding steps, prompts of a
couple of hundred tokens, small training batches) have a lane of their own and never wait behind a long
one; long requests take turns in the other. Within a lane the peer served least so far goes next
(start-time fair queuing over each request's cost, plus REQUEST_COST), whatever its request's priority,
so one peer's queue waits behind its own work, not in front of others'; a peer's own requests, and peers
served alike, go by priority: inference steps before training. (Priority across peers let one peer
stepping sessions back to back hold every other peer's training back for seconds.)

Each request's working memory (server.working_memory) is reserved when it starts and released when it
ends: a short request runs in the short lane only if it fits that lane's part of the budget.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable
from typing import Any

from swarmtune.server.working_memory import WorkingMemory

INFERENCE, FORWARD, BACKWARD = 0, 1, 2
# In the callers' cost unit (server.handler: tokens x attended positions): a decoding step of 64 rows at 3,000
# positions, or a 200-token prompt. No more: each such request holds the lane while it runs, and a peer keeping
# several in flight would make every decoding step wait for one of them.
SHORT_COST = 256.0
# What every request costs its peer's fair share on top of its own cost (the same unit): a decoding step reads every
# weight as a prompt of dozens of tokens does, and its fixed work (Python, hand-offs, the cache) is per request. Without
# it, a peer stepping sessions of one token back to back was served 66 steps for each 2x32 training forward of
# another, each step taking nearly as long.
REQUEST_COST = 64.0


class _Lane:
    """One compute thread and its queues: priority -> peer -> requests."""

    def __init__(self, name: str, memory: WorkingMemory):
        self._memory = memory
        self._changed = threading.Condition()
        self._queues: dict[int, dict[str, collections.deque]] = collections.defaultdict(dict)
        self._served: dict[str, float] = {}  # peer -> the cost served to it, on the clock below
        self._clock = 0.0                     # the served cost of the request that started last
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, priority: int, peer: str, job: tuple) -> None:
        with self._changed:
            queues = self._queues[priority]
            if peer not in queues:  # a peer that was idle starts level with the others, not with credit
                queues[peer] = collections.deque()
                self._served[peer] = max(self._served.get(peer, 0.0), self._clock)
            queues[peer].append(job)
            self._changed.notify()

    def discard(self, priority: int, peer: str, job: tuple) -> bool:
        """Take a queued request back (its caller gave up); False if it has started already."""
        with self._changed:
            queue = self._queues[priority].get(peer, ())
            at = next((i for i, queued in enumerate(queue) if queued is job), None)  # by identity: args hold tensors
            if at is None:
                return False
            del queue[at]
            if not queue:
                del self._queues[priority][peer]
            return True

    def _next(self):
        """The next request (the caller holds the lock), or None when stopping: the peer served least goes next,
        with its most urgent request; between peers served alike, the more urgent request, then the one queued
        first."""
        while not self._stopping:
            waiting = [(peer, priority) for priority in sorted(self._queues) for peer in self._queues[priority]]
            if waiting:
                peer, priority = min(waiting, key=lambda w: (self._served[w[0]], w[1]))
                queues = self._queues[priority]
                job = queues[peer].popleft()
                self._clock = self._served[peer]
                self._served[peer] += job[-1] + REQUEST_COST
                if not queues[peer]:
                    del queues[peer]
                if len(self._served) > 64 + 2 * sum(len(q) for q in self._queues.values()):
                    self._forget_idle()
                return job
            self._changed.wait()
        return None

    def _forget_idle(self) -> None:
        """Idle peers the clock has caught up with would restart at the clock anyway: forget them, so that
        many peers leave no trace."""
        active = {peer for queues in self._queues.values() for peer in queues}
        for peer in [p for p, served in self._served.items() if p not in active and served <= self._clock]:
            del self._served[peer]

    def _run(self) -> None:
        while True:
            with self._changed:
                job = self._next()
            if job is None:
                return
            fn, args, loop, future, peer, memory, _ = job
            self._memory.reserve(peer, memory)
            try:
                result, error = fn(*args), None
            except BaseException as e:  # delivered to the awaiting handler, which replies with it
                result, error = None, e
            finally:
                self._memory.release(peer, memory)
            loop.call_soon_threadsafe(_resolve, future, result, error)

    def shutdown(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(timeout=10)


class PriorityExecutor:
    def __init__(self, name: str = "compute", memory: WorkingMemory | None = None):
        self.memory = memory or WorkingMemory(1 << 62)  # None: unbounded (an executor used alone)
        self._short, self._long = _Lane(f"{name}-short", self.memory), _Lane(f"{name}-long", self.memory)

    async def submit(self, priority: int, fn: Callable[..., Any], *args, peer: str = "", cost: float = 1.0,
                     memory: int = 0) -> Any:
        """`fn(*args)` on a compute thread; `cost` (any unit, the same for every request, SHORT_COST's for
        the lane) is what the request takes from `peer`'s fair share; `memory`, the working memory it holds
        while it runs (within its lane's part of the budget: the caller checked it fits the long lane's)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        short = cost <= SHORT_COST and memory <= self.memory.lane_bytes(short=True)
        lane = self._short if short else self._long
        job = (fn, args, loop, future, peer, memory, cost)
        lane.put(priority, peer, job)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # a queued request is dropped with its tensors; a running one still uses what the caller's
            # cleanup is about to release (KV cache, budgets), so the caller waits until it ends
            if not lane.discard(priority, peer, job):
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({future})
            raise

    def shutdown(self) -> None:
        self._short.shutdown()
        self._long.shutdown()


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
