"""The budgets a server charges peers against: KV memory shared fairly with eviction of idle hogs, and bytes of
requests being received. The RPC-level attacks are in test_hostile_clients.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from swarmtune.server.receiving import Intake, ReceiveBudget
from swarmtune.server.requests import RequestError, ServerBusy
from swarmtune.server.sessions import CacheBudget


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def idle_for(lease, seconds: float) -> None:
    lease.idle_since = time.monotonic() - seconds


def test_a_waiting_peer_evicts_the_idle_sessions_of_a_peer_over_its_share():
    async def scenario():
        budget = CacheBudget(100, evict_idle_after=1.0)
        hog = [await budget.acquire("hog", 50, 1) for _ in range(2)]
        evicted = []
        for lease in hog:
            lease.on_evict = lambda lease=lease: evicted.append(lease)
            idle_for(lease, 2.0)
        mine = await budget.acquire("legit", 30, 1)
        return budget, hog, mine, evicted

    budget, hog, mine, evicted = run(scenario())
    assert evicted == [hog[0]] and hog[0].evicted and not hog[1].evicted  # one was enough, the most idle
    assert budget.used == 80 and mine in budget.leases and budget.evictions == 1
    budget.release(hog[0])  # the handler's own release after an eviction changes nothing
    assert budget.used == 80


@pytest.mark.parametrize("leases, wanted", [
    ([("hog", 80, 0.0)], 30),                        # recently active
    ([("hog", 80, None)], 30),                       # running a step now, however long
    ([("hog", 30, 10.0), ("busy", 60, None)], 20),   # within its share (a third of 100) however idle
    ([("hog", 60, 10.0)], 100),                      # the requester would end up above its own share
    ([("hog", 60, None), ("hog", 10, 10.0)], 45),    # evicting the idle one would not make room
], ids=["recently active", "busy", "within its share", "requester over its share", "would not make room"])
def test_sessions_not_evicted(leases: list[tuple[str, int, float | None]], wanted: int):
    async def scenario():
        budget = CacheBudget(100, evict_idle_after=1.0)
        held = []
        for peer, nbytes, idle in leases:
            lease = await budget.acquire(peer, nbytes, 1)
            lease.idle_since = None if idle is None else time.monotonic() - idle
            held.append(lease)
        with pytest.raises(ServerBusy, match="no room"):
            await budget.acquire("legit", wanted, 0.3)
        return held, budget

    held, budget = run(scenario())
    assert not any(lease.evicted for lease in held) and budget.evictions == 0


def test_a_peer_over_its_share_does_not_take_freed_memory_ahead_of_a_poorer_waiter():
    async def scenario():
        budget = CacheBudget(100, evict_idle_after=60.0)
        first = await budget.acquire("hog", 60, 1)
        blocker = await budget.acquire("other", 40, 1)
        legit = asyncio.create_task(budget.acquire("legit", 40, 5))
        hog = asyncio.create_task(budget.acquire("hog", 40, 5))
        await asyncio.sleep(0.2)
        budget.release(blocker)  # room for one of them: the peer holding nothing gets it
        got = await legit
        await asyncio.sleep(0.2)
        assert not hog.done()
        budget.release(first)
        return got, await hog, budget

    got, second, budget = run(scenario())
    assert got.peer == "legit" and second.peer == "hog" and budget.used == 80


def test_two_peers_that_each_want_more_than_half_do_not_block_each_other():
    """Both wait for more than their share; when memory frees, one of them gets it rather than neither."""
    async def scenario():
        budget = CacheBudget(100)
        blocker = await budget.acquire("c", 50, 1)
        waiters = [asyncio.create_task(budget.acquire(peer, 60, 1.5)) for peer in "ab"]
        await asyncio.sleep(0.2)
        budget.release(blocker)
        return await asyncio.gather(*waiters, return_exceptions=True)

    results = run(scenario())
    assert sorted(type(r).__name__ for r in results) == ["Lease", "ServerBusy"], results


def test_a_session_larger_than_the_whole_budget_is_the_clients_error():
    with pytest.raises(RequestError, match="whole cache budget") as raised:
        run(CacheBudget(100).acquire("a", 101, 1))
    assert not raised.value.retry


def test_received_bytes_are_bounded_per_peer_and_in_all():
    budget = ReceiveBudget(total=10, per_peer=6)
    first, second, third = Intake(budget, "a"), Intake(budget, "a"), Intake(budget, "b")
    first.charge(4)
    with pytest.raises(ServerBusy, match="this peer's requests already hold 4 bytes"):
        second.charge(3)
    third.charge(6)
    with pytest.raises(ServerBusy, match="hold 10 of 10 bytes"):
        Intake(budget, "c").charge(1)
    first.release()
    third.release()
    second.release()  # charged nothing
    assert budget.used == 0 and not budget.by_peer
