"""The compute thread: inference before training, and within a priority the peer served least goes next."""

from __future__ import annotations

import asyncio
import threading

from swarmtune.server.executor import BACKWARD, FORWARD, INFERENCE, PriorityExecutor


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
    order = run_queued([(FORWARD, "a", 10.0), (FORWARD, "a", 10.0), (FORWARD, "b", 3.0), (FORWARD, "b", 3.0),
                        (FORWARD, "b", 3.0)])
    assert order == ["a0", "b2", "b3", "b4", "a1"]


def test_inference_goes_first_whoever_queued_training():
    order = run_queued([(BACKWARD, "a", 1.0), (FORWARD, "a", 1.0), (INFERENCE, "b", 1.0)])
    assert order == ["b2", "a1", "a0"]
