"""The compute threads: the peer served least goes next, inference before training among peers served alike and
within a peer, and short requests have a lane of their own."""

from __future__ import annotations

import asyncio
import threading

import pytest

from swarmtune.server.executor import BACKWARD, FORWARD, INFERENCE, SHORT_COST, PriorityExecutor
from swarmtune.server.working_memory import WorkingMemory


def run_queued(jobs: list[tuple[int, str, float]]) -> list[str]:
    """Queue `jobs` (priority, peer, cost) behind a job that holds the thread, then let them run: their order."""
    executor, order, hold = PriorityExecutor(), [], threading.Event()

    async def main():
        blocker = asyncio.ensure_future(executor.submit(FORWARD, hold.wait, peer="blocker"))
        await asyncio.sleep(0.05)  # the thread is now inside hold.wait
        tasks = []
        for i, (priority, peer, cost) in enumerate(jobs):
            tasks.append(asyncio.ensure_future(executor.submit(priority, order.append, f"{peer}{i}", peer=peer,
                                                               cost=cost)))
            await asyncio.sleep(0)  # queued in this order
        hold.set()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 10)

    try:
        asyncio.run(main())
    finally:
        executor.shutdown()
    return order


def test_a_peer_with_a_long_queue_does_not_starve_another():
    order = run_queued([(FORWARD, "a", 100.0)] * 5 + [(FORWARD, "b", 1.0)])
    assert order[:2] == ["a0", "b5"] and order[2:] == ["a1", "a2", "a3", "a4"]


def test_costly_requests_count_for_more():
    """b's cheap requests run while a's one costly request is worth several of them."""
    order = run_queued([(FORWARD, "a", 250.0), (FORWARD, "a", 250.0), (FORWARD, "b", 10.0), (FORWARD, "b", 10.0),
                        (FORWARD, "b", 10.0)])  # each + REQUEST_COST: 314 against 74
    assert order == ["a0", "b2", "b3", "b4", "a1"]


def test_every_request_costs_something():
    """A request of cost 1 (a one-token decoding step) is charged REQUEST_COST more, as long as it takes: a's
    queue of them lets b's second request of cost 64 (a 2x32 training forward) run after one more of them, not
    after all (64 would be worth as much)."""
    order = run_queued([(FORWARD, "a", 1.0)] * 8 + [(FORWARD, "b", 64.0)] * 2)
    assert order[:4] == ["a0", "b8", "a1", "b9"]


def test_inference_goes_first_whoever_queued_training():
    order = run_queued([(BACKWARD, "a", 1.0), (FORWARD, "a", 1.0), (INFERENCE, "b", 1.0)])
    assert order == ["b2", "a1", "a0"]


def test_a_peer_stepping_back_to_back_does_not_hold_back_others_training():
    """Priority does not cross peers: b's queue of inference steps, worth more than a's training request, lets that
    request run after b's first step, not after all of them."""
    order = run_queued([(INFERENCE, "b", 10.0)] * 5 + [(FORWARD, "a", 20.0), (INFERENCE, "b", 10.0)])
    assert order[:2] == ["b0", "a5"] and sorted(order[2:]) == ["b1", "b2", "b3", "b4", "b6"]


def test_a_short_request_does_not_wait_behind_a_long_one():
    """A long request holds its lane; short ones (another peer's decoding steps) run meanwhile, and a second
    long one waits its turn."""
    executor, hold, order = PriorityExecutor(), threading.Event(), []

    async def main():
        long = asyncio.ensure_future(executor.submit(FORWARD, hold.wait, peer="a", cost=SHORT_COST * 100))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(executor.submit(FORWARD, order.append, "long", peer="c", cost=SHORT_COST + 1))
        for i in range(3):
            await asyncio.wait_for(executor.submit(INFERENCE, order.append, f"short{i}", peer="b", cost=8.0), 5)
        assert not queued.done()
        hold.set()
        await asyncio.wait_for(asyncio.gather(long, queued), 10)

    try:
        asyncio.run(main())
    finally:
        executor.shutdown()
    assert order == ["short0", "short1", "short2", "long"]


def test_a_cancelled_request_leaves_the_queue_and_a_running_one_is_waited_for():
    """A caller that gives up takes its queued request (and its tensors) back; if it runs already, the caller's
    cancellation completes only when the request ends, so that its cleanup cannot free what is in use."""
    executor, hold, ran = PriorityExecutor(), threading.Event(), []

    async def main():
        running = asyncio.ensure_future(executor.submit(FORWARD, hold.wait, peer="a"))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(executor.submit(FORWARD, ran.append, "queued", peer="b"))
        await asyncio.sleep(0.05)
        queued.cancel()
        running.cancel()
        await asyncio.sleep(0.2)
        assert not running.done()  # still inside hold.wait
        hold.set()
        for task in (queued, running):
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
        await asyncio.wait_for(executor.submit(FORWARD, ran.append, "later", peer="b"), 5)

    try:
        asyncio.run(main())
    finally:
        executor.shutdown()
    assert ran == ["later"]


def test_working_memory_is_held_while_a_request_runs_and_released_on_every_path():
    """Reserved when the request starts (not while queued), released when it ends, raising or not; a request
    larger than the short lane's part of the budget runs in the long lane, however cheap."""
    memory = WorkingMemory(800)
    executor, seen = PriorityExecutor(memory=memory), []

    def fail():
        seen.append((threading.current_thread().name, memory.used, dict(memory.by_peer)))
        raise ValueError("boom")

    async def main():
        await executor.submit(FORWARD, lambda: seen.append((threading.current_thread().name, memory.used)),
                              peer="a", cost=1.0, memory=100)
        with pytest.raises(ValueError, match="boom"):
            await executor.submit(FORWARD, fail, peer="b", cost=1.0, memory=700)

    try:
        asyncio.run(asyncio.wait_for(main(), 10))
    finally:
        executor.shutdown()
    assert seen == [("compute-short", 100), ("compute-long", 700, {"b": 700})]
    assert memory.used == 0 and memory.by_peer == {}
