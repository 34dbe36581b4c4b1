"""The budgets a server charges peers against: KV memory shared fairly with eviction of idle hogs, and bytes of
requests being received. The RPC-level attacks are in test_hostile_clients.py."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from swarmtune import wire
from swarmtune.server import rate_limit
from swarmtune.server.receiving import Intake, ReceiveBudget
from swarmtune.server.requests import PeerOverLimit, RequestError, ServerBusy
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
    ([("hog", 60, 10.0)], 100),                      # the requester would end up above its own share
    ([("hog", 60, None)], 60),                       # likewise, with the hog busy
], ids=["requester over its share", "busy, requester over its share"])
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


def test_a_peer_over_its_share_loses_its_oldest_sessions_active_or_not_once_idle_ones_are_not_enough():
    """Idle sessions first (most idle first), then the oldest of peers over their share, active or running a
    step: a running one's memory goes back to the budget now, its cache once its step ends (its owner's job)."""
    async def scenario():
        budget = CacheBudget(100, evict_idle_after=1.0)
        hog = [await budget.acquire("hog", 30, 1) for _ in range(3)]  # oldest first
        freed = []
        for lease in hog:
            lease.on_evict = lambda lease=lease: freed.append(lease)
        hog[0].idle_since = None        # running a step
        hog[1].idle_since = time.monotonic()  # just stepped
        idle_for(hog[2], 5.0)
        mine = await budget.acquire("legit", 50, 1)
        return budget, hog, mine, freed

    budget, hog, mine, freed = run(scenario())
    assert [lease.evicted for lease in hog] == [True, False, True]  # the idle one, then the oldest
    assert freed == [hog[2]]  # the running one's cache goes when its step ends
    assert budget.used == 80 and mine in budget.leases and budget.evictions == 2


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
    """One message's worth per peer; the last quarter of the budget only for peers within their share."""
    budget = ReceiveBudget(total=12, per_peer=8)
    a, b, c, d = (Intake(budget, peer) for peer in "abcd")
    a.charge(4)
    with pytest.raises(PeerOverLimit, match="this peer's requests already hold 4 bytes"):
        Intake(budget, "a").charge(5)
    b.charge(4)
    with pytest.raises(PeerOverLimit, match="more than its share"):
        a.charge(3)  # 7 of 12 with b holding some, into the last quarter
    c.charge(2)  # a newcomer within its share may use the last quarter
    with pytest.raises(PeerOverLimit, match="more than its share"):
        c.charge(3)
    with pytest.raises(ServerBusy, match="hold 10 of 12 bytes") as raised:
        d.charge(3)  # within its share, but the budget is full: nobody's excess
    assert not isinstance(raised.value, PeerOverLimit)
    for intake in (a, b, c, d):
        intake.release()
    assert budget.used == 0 and not budget.by_peer


@pytest.fixture
def clock(monkeypatch):
    """The rate limiter's clock, moved by hand."""
    now = [1000.0]
    monkeypatch.setattr(rate_limit.time, "monotonic", lambda: now[0])
    return now


def test_a_peer_bursts_to_its_rate_then_keeps_to_it(clock):
    limiter = rate_limit.RateLimiter(10)
    assert all(limiter.admit("a") for _ in range(10))
    assert not limiter.admit("a")
    assert limiter.admit("b")  # another peer has its own share
    clock[0] += 0.25  # 2.5 requests' worth
    assert [limiter.admit("a") for _ in range(3)] == [True, True, False]
    clock[0] += 60  # a long pause refills one second's worth, no more
    assert sum(limiter.admit("a") for _ in range(20)) == 10


def test_charges_leave_a_bounded_debt(clock):
    limiter = rate_limit.RateLimiter(10)
    for _ in range(100):
        limiter.charge("a", 9)  # malformed requests, counted nine more times each
    assert not limiter.admit("a")
    clock[0] += 2.05  # one second's worth of debt repaid, then one request's worth
    assert limiter.admit("a")


def test_many_peers_leave_no_trace_once_idle(clock, monkeypatch):
    monkeypatch.setattr(rate_limit, "MAX_PEERS", 100)
    limiter = rate_limit.RateLimiter(10)
    for i in range(100):
        limiter.admit(f"p{i}")
    clock[0] += 1.0  # every bucket full again
    limiter.admit("newcomer")
    assert len(limiter._buckets) == 1


def test_refusals_are_held_within_bounds(monkeypatch):
    """A refusal for a peer's own excess waits out the delay, unless the peer (or everyone) has too many held."""
    monkeypatch.setattr(rate_limit, "HELD_PER_PEER", 3)
    monkeypatch.setattr(rate_limit, "HELD_IN_ALL", 5)

    async def scenario() -> list[bool]:
        tarpit = rate_limit.Tarpit(0.05)
        held = await asyncio.gather(*(tarpit.hold(peer) for peer in ["a"] * 4 + ["b"] * 2 + ["c"] * 2))
        assert tarpit.total == 0 and not tarpit.held  # all released
        assert not await rate_limit.Tarpit(0).hold("a")  # a delay of 0: at once
        return held

    assert asyncio.run(scenario()) == [True, True, True, False, True, True, False, False]


def test_the_containers_of_a_header_are_bounded_from_its_bytes():
    """Every array and map starts with a byte of a few ranges; counting them bounds a header's parsing cost."""
    small = wire.pack({"start": 0, "end": 1, "lora": {"rank": 8}}, {"hidden": torch.zeros(1, 2, 3)})
    assert 4 <= wire.containers_bound(small) <= 8  # the header, meta, lora, the tensor list, a spec and its shape
    nested = wire.pack({"x": [[[]] * 100] * 10})
    assert wire.containers_bound(nested) >= 1 + 10 + 1000
    assert wire.unpack(nested)[0] == {"x": [[[]] * 100] * 10}  # parsed the same without counting hooks
    with pytest.raises(wire.WireError, match="arrays and maps"):
        wire.unpack(wire.pack({"x": [[]] * (wire.MAX_CONTAINERS + 1)}))


def test_a_costly_request_is_admitted_from_half_a_bucket_into_bounded_debt(clock):
    limiter = rate_limit.RateLimiter(10)
    assert limiter.admit("a", 1000)  # a full bucket: admitted, ten seconds' worth charged but one kept as debt
    assert not limiter.admit("a", 1000)
    clock[0] += 1.45
    assert not limiter.admit("a", 1000)  # not yet half a bucket
    clock[0] += 0.1
    assert limiter.admit("a", 1000)


def test_memory_a_poorer_peer_held_a_moment_ago_is_not_taken_by_a_peer_over_its_share(monkeypatch):
    """A client between two sessions finds its room again: the hog, over its share, may not re-take what the
    client freed, until the client has held nothing for RECENT seconds."""
    monkeypatch.setattr(CacheBudget, "RECENT", 0.5)

    async def scenario():
        budget = CacheBudget(100, evict_idle_after=60.0)
        hog = await budget.acquire("hog", 80, 1)
        session = await budget.acquire("legit", 20, 1)
        budget.release(session)
        with pytest.raises(ServerBusy, match="no room"):
            await budget.acquire("hog", 20, 0.2)
        again = await budget.acquire("legit", 20, 0.2)  # its room is still there
        budget.release(again)
        started = time.monotonic()
        more = await budget.acquire("hog", 20, 5)  # once the client has been gone for RECENT seconds
        return time.monotonic() - started, hog, more, budget

    waited, hog, more, budget = run(scenario())
    assert waited >= 0.3 and budget.used == 100


def test_a_frame_waits_for_room_then_says_why_it_could_not_have_any():
    async def scenario():
        budget = ReceiveBudget(total=12, per_peer=8)
        holder, waiter = Intake(budget, "a"), Intake(budget, "b", wait=5)
        holder.charge(8)
        waited = asyncio.create_task(waiter.reserve(6))  # within b's share, but there is no room
        await asyncio.sleep(0.1)
        assert not waited.done() and waiter.short_of_room is not None
        holder.release()
        await waited  # room came: charged
        assert waiter.nbytes == 6 and waiter.short_of_room is None
        late = Intake(budget, "c", wait=0.2)
        with pytest.raises(PeerOverLimit):
            await late.reserve(7)  # over its share into the last quarter, and nobody releases
        assert "waiting for room: this peer's requests would hold 7 bytes" in late.timed_out("no whole message")

    run(scenario())
