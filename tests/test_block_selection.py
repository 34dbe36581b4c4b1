"""Block selection: where a joining server goes, and when a serving one moves."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from swarmtune import records
from swarmtune.records import ServerInfo
from swarmtune.server import block_selection
from swarmtune.server.block_selection import (
    back_off,
    block_throughputs,
    choose_best_span,
    join_start,
    kept_blocks,
    layout,
    leximin_gain,
    load_order,
    plan,
    served_throughputs,
    should_move,
    suspects,
)


def server(name: str, start: int, end: int, throughput: float = 1.0) -> ServerInfo:
    return ServerInfo(name, start, end, throughput=throughput)


def test_block_throughputs_sum_covering_servers_and_are_zero_where_none():
    servers = [server("a", 0, 3, 0.1), server("b", 1, 4, 0.2), server("c", 6, 8, 0.3)]
    totals = block_throughputs(servers, 8)
    np.testing.assert_allclose(totals, [0.1, 0.3, 0.3, 0.2, 0, 0, 0.3, 0.3])
    assert totals[4] == 0 and totals[5] == 0  # exactly: holes are found by == 0
    assert list(block_throughputs([], 3)) == [0, 0, 0]


def test_a_joining_server_fills_the_gap_then_the_weakest_region():
    assert choose_best_span([server("a", 0, 4), server("b", 8, 12)], 12, 4, 1.0) == 4
    assert choose_best_span([server("a", 0, 6, 5.0), server("b", 6, 12, 1.0)], 12, 6, 1.0) == 6
    # the weakest block (5) must be inside, and then as many of the next weakest (0-4, not 6-11)
    servers = [server("a", 0, 5, 2.0), server("b", 6, 12, 3.0), server("c", 5, 6, 1.0)]
    assert choose_best_span(servers, 12, 3, 1.0) == 3


def test_ties_go_to_the_lowest_start_or_spread_with_an_rng():
    assert choose_best_span([], 12, 4, 1.0) == 0
    rng = random.Random(0)
    starts = {choose_best_span([], 12, 4, 1.0, rng) for _ in range(50)}
    assert len(starts) > 3 and starts <= set(range(9))


def test_a_server_stays_when_the_swarm_is_balanced_or_the_gain_is_small():
    tiling = [server("a", 0, 4), server("b", 4, 8), server("c", 8, 12)]
    assert all(should_move(tiling, 12, s) is None for s in tiling)
    # moving "d" from 0:4 to 4:8 raises the weakest block from 1.0 to 1.1 only
    servers = tiling + [server("d", 0, 4, 0.1), server("e", 8, 12, 0.1)]
    assert should_move(servers, 12, servers[3]) is None


def test_leximin_gain_compares_the_weakest_block_where_two_layouts_differ():
    assert leximin_gain(np.array([2.0, 1.0, 3.0]), np.array([3.0, 1.0, 2.0])) == 1.0  # the same, sorted
    assert leximin_gain(np.array([1.0, 1.5, 3.0]), np.array([1.0, 1.2, 9.0])) == pytest.approx(1.25)
    assert leximin_gain(np.array([1.0, 1.0]), np.array([2.0, 0.5])) == 2.0
    assert leximin_gain(np.array([0.5, 0.5]), np.array([0.0, 3.0])) == np.inf  # serving an unserved block


def test_one_of_two_redundant_servers_moves_where_the_swarm_plans_it():
    servers = [server("a", 0, 8), server("b", 0, 4), server("d", 0, 4)]  # blocks 4-7 have half the throughput
    assert plan(servers, 8) == {"a": 0, "b": 4, "d": 0}
    assert plan(servers[::-1], 8) == plan(servers, 8)  # every reader of the view plans alike
    assert should_move(servers, 8, servers[1]) == 4
    assert should_move(servers, 8, servers[2]) is None


def test_in_a_large_swarm_a_server_moves_when_the_weakest_block_gains_markedly(monkeypatch):
    monkeypatch.setattr(block_selection, "PLAN_MAX_SERVERS", 0)
    servers = [server("a", 0, 8), server("b", 0, 4), server("d", 0, 4)]
    assert should_move(servers, 8, servers[2]) == 4
    assert should_move(servers, 8, servers[2], min_gain=2.5) is None


def test_moves_no_single_one_pays_for_are_made_one_after_another_when_the_leap_is_large():
    # the big server's span leaves one block at each end to one small server each (weakest: 1.0); with it at
    # 0:10 and both small ones at 9:12, the weakest block gets 2.0, but every single move first makes a hole
    servers = {s.peer_id: s for s in [server("a", 1, 11, 8.0), server("b", 0, 3), server("c", 9, 12)]}
    assert plan(list(servers.values()), 12) == {"a": 0, "b": 9, "c": 9}
    order = []
    for _ in range(4):
        for name, me in servers.items():
            start = should_move(list(servers.values()), 12, me)
            if start is not None:  # loaded at once here; a real server shows as joining meanwhile
                servers[name] = ServerInfo(name, start, start + me.end - me.start, throughput=me.throughput)
                order.append(name)
    assert order == ["a", "b"]  # the big one first (nobody else serves its blocks meanwhile: one at a time)
    assert block_throughputs(list(servers.values()), 12).min() == 2.0


def test_a_planned_move_waits_while_its_blocks_have_no_other_server():
    loading = [server("a", 4, 8), server("b", 0, 4), ServerInfo("d", 0, 4, "joining", throughput=2.0, pinned=True)]
    assert plan(loading, 8)["b"] == 4
    assert should_move(loading, 8, loading[1]) is None  # d may yet fail to load
    loaded = [*loading[:2], ServerInfo("d", 0, 4, throughput=2.0, pinned=True)]
    assert should_move(loaded, 8, loaded[1]) == 4


def test_a_server_whose_going_would_leave_blocks_unserved_waits_for_the_wave_before_it():
    servers = {s.peer_id: s for s in [server("a", 3, 5, 2.0), server("b", 2, 6, 2.0), server("c", 4, 8),
                                      server("d", 0, 4)]}
    assert plan(list(servers.values()), 8) == {"a": 0, "b": 2, "c": 4, "d": 4}  # the weakest block: 1.0 -> 2.0
    assert should_move(list(servers.values()), 8, servers["d"]) is None  # blocks 0-1 have nobody else yet
    assert should_move(list(servers.values()), 8, servers["a"]) == 0  # its blocks keep 3.0 of the weakest 1.0
    servers["a"] = ServerInfo("a", 0, 2, "joining", throughput=2.0)
    assert should_move(list(servers.values()), 8, servers["d"]) is None  # a may yet fail to load
    servers["a"] = server("a", 0, 2, 2.0)
    assert should_move(list(servers.values()), 8, servers["d"]) == 4


def test_a_joining_server_takes_its_place_in_the_plan_where_a_single_span_leaves_a_hole():
    servers = [server("a", 6, 12), server("b", 1, 5, 2.0)]  # blocks 0 and 5 unserved: no 4 blocks cover both
    assert choose_best_span(servers, 12, 4, 2.0) == 5
    start = join_start(servers, 12, ServerInfo("j", 0, 4, "joining", throughput=2.0))
    joined = [*servers, ServerInfo("j", start, start + 4, "joining", throughput=2.0)]
    moved = should_move(joined, 12, servers[1])  # b makes room while j loads
    assert start != 5 and moved is not None
    assert block_throughputs([servers[0], server("b", moved, moved + 4, 2.0), joined[-1]], 12).min() == 1.0


def test_the_servers_checked_for_life_are_those_of_thinly_held_blocks_or_all_in_a_small_swarm():
    thick = [server(f"t{i:02}", 0, 4) for i in range(block_selection.MAX_PROBES)]
    thin = [server("x", 4, 8), ServerInfo("y", 4, 6, "joining")]
    assert [s.peer_id for s in suspects(thick + thin, 8)] == ["x"]  # a joining server is not serving yet
    assert suspects([*thick, server("z", 0, 4)], 4) == []
    few = suspects(thick[:5] + thin, 8)  # a burst can kill every server of a block: check them all, thinnest first
    assert [s.peer_id for s in few] == ["x", "t00", "t01", "t02", "t03", "t04"]
    reported = suspects(thick + thin, 8, frozenset({"t07", "y", "gone"}))  # reports first, whatever they hold
    assert [s.peer_id for s in reported] == ["y", "t07", "x"]


def test_reports_of_unreachable_servers_are_read_as_peer_ids_or_not_at_all():
    assert records.reported_peers(["a", 3, "b" * 129, "c"]) == {"a", "c"}
    for malformed in ({"a": 1}, "a", None, ["a"] * (records.MAX_REPORTED + 1)):
        assert records.reported_peers(malformed) == frozenset()


def test_a_redundant_server_moves_to_cover_a_hole():
    servers = [server("a", 0, 4), server("b", 0, 4), server("c", 4, 8)]
    assert should_move(servers, 12, servers[0]) == 8 and should_move(servers, 12, servers[1]) is None


def test_a_chain_of_moves_closes_a_hole_no_single_move_can():
    # 12 blocks, 3 x 4: only the exact tiling covers everything, and no one server can get there alone
    servers = {s.peer_id: s for s in [server("a", 0, 4), server("b", 2, 6), server("c", 6, 10)]}
    assert _settle(servers, 12) == 0
    assert sorted(s.span for s in servers.values()) == [(0, 4), (4, 8), (8, 12)]


@pytest.mark.parametrize("seed", range(20))
def test_servers_that_can_cover_the_model_end_up_covering_it(seed):
    rng = random.Random(seed)
    num_blocks, servers, slots = 24, {}, 0
    while slots < num_blocks + rng.randrange(8):
        length = rng.randint(2, 8)
        start = rng.randrange(num_blocks - length + 1)
        servers[f"s{len(servers)}"] = server(f"s{len(servers)}", start, start + length, rng.uniform(0.5, 4))
        slots += length
    assert _settle(servers, num_blocks) == 0


def test_a_server_loading_its_span_serves_part_of_it_and_is_planned_with_all_of_it():
    loading = ServerInfo("a", 5, 7, throughput=2.0, target=(4, 8))
    assert ServerInfo.from_record("a", loading.to_record()) == loading
    assert ServerInfo.from_record("a", {**loading.to_record(), "target": [5, 6]}) is None  # serves beyond it
    assert ServerInfo.from_record("a", {**loading.to_record(), "target": "4:8"}) is None
    np.testing.assert_allclose(served_throughputs([loading, server("b", 0, 8)], 8), [1, 1, 1, 1, 1, 3, 3, 1])
    np.testing.assert_allclose(block_throughputs([loading, server("b", 0, 8)], 8), [1, 1, 1, 1, 3, 3, 3, 3])
    assert served_throughputs([ServerInfo("j", 0, 4, "joining")], 4).max() == 0
    further, done = dataclasses.replace(loading, start=4), dataclasses.replace(loading, start=4, end=8, target=None)
    assert layout([loading]) == layout([further]) != layout([done])  # how far a load has got alone: no news


def test_blocks_load_holes_first_and_outward_so_that_what_is_served_stays_one_span():
    served = np.array([2.0, 2.0, 0.0, 0.0, 1.0, 3.0, 1.0, 1.0])
    assert load_order(served, 0, 6) == [2, 3, 4, 1, 0, 5]  # from the first hole, each next the weaker neighbour
    assert load_order(served, 3, 5) == [3, 4, 5, 6, 7]
    assert load_order(served, 2, 6, kept=range(5, 7)) == [7, 4, 3, 2]  # outward from the blocks it keeps
    for start in range(4):
        order = load_order(served, start, 5)
        assert sorted(order) == list(range(start, start + 5))
        assert all(max(order[:i + 1]) - min(order[:i + 1]) == i for i in range(5))  # contiguous at every step


def test_a_move_keeps_the_blocks_both_spans_share_and_is_planned_to_take_only_the_loading_of_the_rest():
    assert kept_blocks(range(2, 8), 4, 6) == range(4, 8)
    assert kept_blocks(range(2, 8), 0, 6) == range(2, 6)
    assert len(kept_blocks(range(2, 8), 8, 4)) == 0 and len(kept_blocks(range(0), 0, 4)) == 0
    spans = block_selection._spans([server("a", 0, 6), server("b", 6, 12)], 12)
    shift, shift_unserved_s = block_selection._waves(spans, 12, {"a": 1, "b": 6})
    jump, jump_unserved_s = block_selection._waves(spans, 12, {"a": 6, "b": 6})
    assert shift[0][2] == block_selection.MOVE_S + block_selection.LOAD_S_PER_BLOCK * 1  # one block to load
    assert jump[0][2] == block_selection.MOVE_S + block_selection.LOAD_S_PER_BLOCK * 6
    assert shift_unserved_s == jump_unserved_s == block_selection.HORIZON_S  # block 0 (or 0-5) never served again


def test_blocks_a_move_leaves_to_a_loading_server_count_as_unserved_until_it_gets_to_them():
    loading = ServerInfo("l", 6, 8, target=(0, 8))  # loads 5, 4, ..., 0 next
    spans = block_selection._spans([server("x", 0, 4), loading, server("y", 8, 12)], 12)
    load_s = block_selection.LOAD_S_PER_BLOCK
    assert block_selection._waves(spans, 12, {"x": 0, "l": 0, "y": 8})[1] == 0  # staying: 4, 5 load anyway
    waves, unserved_s = block_selection._waves(spans, 12, {"x": 8, "l": 0, "y": 8})
    assert [s.peer_id for s in waves[0][0]] == ["x"] and unserved_s == 6 * load_s  # 0-3 wait for l
    crashed = block_selection._spans([server("x", 0, 4), loading], 12)  # y gone: 8-11 unserved
    assert block_selection._waves(crashed, 12, {"x": 0, "l": 0})[1] == block_selection.HORIZON_S  # never served
    assert block_selection._waves(crashed, 12, {"x": 8, "l": 0})[1] == 6 * load_s


def test_blocks_every_server_leaves_are_unserved_however_their_throughputs_round():
    # with these, taking the three away one by one left -1e-9 on blocks 0-5, which passed for a server
    rng = random.Random(0)
    triples = [(2.4594964725869315, 1.2582818151973187, 1.6914923853808896)]
    triples += [tuple(rng.uniform(0.5, 3.0) for _ in range(3)) for _ in range(200)]
    for throughputs in triples:
        servers = [server(name, 0, 6, t) for name, t in zip("abc", throughputs)] + [server("z", 6, 12)]
        waves, unserved_s = block_selection._waves(block_selection._spans(servers, 12), 12,
                                                   {"a": 6, "b": 6, "c": 6, "z": 6})
        assert waves[-1][1] == 0.0  # the last to go leaves blocks 0-5 to nobody
        assert unserved_s == block_selection.HORIZON_S - sum(seconds for _, _, seconds, _ in waves[:-1])


def test_a_hole_is_covered_by_a_server_whose_blocks_others_hold_and_a_wide_one_by_several():
    spans = block_selection._spans([server("a", 0, 4), server("b", 0, 4), server("c", 4, 8)], 12)
    covered = block_selection._cover(spans, 12, {"a": 0, "b": 0, "c": 4})
    assert covered["c"] == 4 and sorted([covered["a"], covered["b"]]) == [0, 8]  # c alone serves 4-7
    spans = block_selection._spans([server(n, 0, 4) for n in "abc"], 12)
    covered = block_selection._cover(spans, 12, {n: 0 for n in "abc"})
    assert sorted(covered.values()) == [0, 4, 8]  # 4-11: two servers load at once, each a half
    servers = [ServerInfo("x", 0, 10, pinned=True), server("a", 0, 6), server("b", 0, 6)]  # 10-15 unserved
    spans, starts = block_selection._spans(servers, 16), {"x": 0, "a": 0, "b": 0}
    alone = block_selection._cover(spans, 16, starts)  # a or b loads all six
    shared = block_selection._cover(spans, 16, starts, parts=2)  # each loads three first, at once
    assert sorted([alone["a"], alone["b"]]) == [0, 10] and (shared["a"], shared["b"]) == (10, 7)
    load_s = block_selection.LOAD_S_PER_BLOCK
    assert block_selection._waves(spans, 16, alone)[1] == block_selection.MOVE_S + 6 * load_s
    assert block_selection._waves(spans, 16, shared)[1] == block_selection.MOVE_S + 3 * load_s
    assert plan(servers, 16) == shared


def test_a_wide_hole_is_shared_by_servers_whose_going_leaves_no_hole_and_a_narrow_one_is_not_shared():
    # 0-11 unserved; b (12-19) alone serves 16-19, and covers as much of a third of the hole as a1 does
    servers = [server("a1", 12, 16), server("a2", 12, 16), server("a3", 12, 16), server("b", 12, 20),
               server("c", 20, 24)]
    spans = block_selection._spans(servers, 24)
    shared = block_selection._cover(spans, 24, {s.peer_id: s.start for s in spans}, parts=3)
    assert shared == {"a1": 8, "a2": 4, "a3": 0, "b": 12, "c": 20}
    # a two-block hole (10-11) is loaded by one server, not by two taking a block each
    spans = block_selection._spans([server("a", 0, 4), server("b", 0, 4), server("c", 0, 4), server("d", 4, 10)], 12)
    for parts in range(1, block_selection.COVER_PARTS + 1):
        covered = block_selection._cover(spans, 12, {"a": 0, "b": 0, "c": 0, "d": 4}, parts)
        assert covered == {"a": 0, "b": 0, "c": 8, "d": 4}


def test_pinned_servers_stay_where_they_are_and_the_others_plan_around_them():
    servers = [ServerInfo("a", 0, 6, pinned=True), server("m", 2, 10)]  # blocks 10-11 unserved
    assert plan(servers, 12) == {"a": 0, "m": 4}
    assert should_move(servers, 12, servers[1]) == 4
    servers = [ServerInfo("z", 0, 6, pinned=True), server("m", 0, 8)]  # unpinned, z could move instead
    assert plan(servers, 12)["z"] == 0


def _settle(servers: dict[str, ServerInfo], num_blocks: int, rounds: int = 10, sizes: list | None = None) -> int:
    """Let servers check in turn, moving as told, until nobody moves; returns the holes left."""
    for _ in range(rounds):
        moved = False
        for name in list(servers):
            me = servers[name]
            start = should_move(list(servers.values()), num_blocks, me, sizes=sizes)
            if start is not None:
                end = start + me.end - me.start if sizes is None else block_selection.span_end(
                    me.capacity, start, num_blocks, block_selection.relative_sizes(sizes))
                servers[name] = ServerInfo(name, start, end, throughput=me.throughput, capacity=me.capacity)
                moved = True
        if not moved:
            break
    return int((block_throughputs(list(servers.values()), num_blocks) == 0).sum())


def test_of_two_servers_claiming_one_gap_the_later_gives_way_to_the_gap_nobody_claimed():
    settled = [server("a", 0, 4), server("b", 8, 12)]
    other = ServerInfo("c", 4, 8, "joining")  # loading 4-8, claimed a moment before `me`: 12-15 left to nobody
    me = ServerInfo("me", 4, 8, "joining")
    assert back_off([*settled, other, me], 16, me) == 12
    mover = ServerInfo("me", 2, 4, throughput=1.0, target=(2, 6))  # moving, keeps 2-3: 4-5 are being loaded by c
    assert back_off([server("a", 0, 4), server("b", 6, 12), other, mover], 16, mover) == 12
    assert back_off([*settled, me], 16, me) is None  # 12-15 unclaimed, but 4-8 is mine alone: another mover's share
    assert back_off([*settled, server("d", 12, 16), other, me], 16, me) is None  # nowhere better: every block held


# DeepSeek-V3's shape in small: 3 dense blocks of 1/20 the memory of the MoE ones after them
SIZES = [0.05] * 3 + [1.0] * 6


def test_a_span_holds_as_many_blocks_as_fit_its_capacity_from_where_it_starts():
    sizes = [0.05] * 3 + [1.0] * 7
    assert block_selection.span_ends(3.0, 10, block_selection.relative_sizes(sizes)) == (5, 5, 5, 6, 7, 8, 9, 10)
    assert block_selection.span_ends(3.0, 10) == (3, 4, 5, 6, 7, 8, 9, 10)  # by count
    assert block_selection.relative_sizes([2.0] * 5) is None  # blocks alike: by count, as before
    assert block_selection.relative_sizes([1, 20, 20]) == (0.05, 1.0, 1.0)


def test_servers_whose_memory_covers_the_model_cover_it_where_counting_blocks_cannot():
    # three servers with memory for 2.15 MoE blocks each, as the model takes 6.15 (by count: 6 of its 9 blocks)
    for sizes, holes in ((SIZES, 0), (None, 3)):
        servers = {}
        for name in "abc":
            me = ServerInfo(name, 0, block_selection.span_end(2.15, 0, 9, block_selection.relative_sizes(sizes)),
                            "joining", capacity=2.15)
            start = join_start(list(servers.values()), 9, me, sizes=sizes)
            end = block_selection.span_end(2.15, start, 9, block_selection.relative_sizes(sizes))
            servers[name] = dataclasses.replace(me, start=start, end=end, state="online")
        assert _settle(servers, 9, sizes=sizes) == holes


def test_a_server_moves_where_its_memory_holds_more_blocks_to_close_a_hole():
    # "a" holds MoE blocks 3-5 with room for 3.15: from block 0 it holds the 3 dense blocks as well
    servers = [ServerInfo("a", 3, 6, capacity=3.15), ServerInfo("b", 6, 9, capacity=3.0)]
    assert plan(servers, 9, SIZES) == {"a": 0, "b": 6}
    assert should_move(servers, 9, servers[0], sizes=SIZES) == 0
    assert should_move(servers, 9, servers[0]) is None  # by count it would leave blocks 3-5 to cover 0-2
    # a record without a capacity (a server of before) is planned with what its span holds: from 0, blocks 0-4
    old = ServerInfo.from_record("a", {k: v for k, v in servers[0].to_record().items() if k != "capacity"})
    (derived,), (announced,) = (block_selection._spans([s], 9, block_selection.relative_sizes(SIZES))
                                for s in (old, servers[0]))
    assert old.capacity == 0.0 and derived.capacity == 3 and derived.length_at(0) == 5 < announced.length_at(0) == 6


def test_equal_sizes_plan_as_counting_blocks_does():
    servers = [server("a", 0, 8), server("b", 0, 4), server("d", 0, 4, 2.0), ServerInfo("e", 6, 9, capacity=5.5)]
    assert plan(servers, 12, [7.0] * 12) == plan(servers, 12)
    assert join_start(servers, 12, server("f", 0, 5), sizes=[7.0] * 12) == join_start(servers, 12, server("f", 0, 5))


def test_a_capacity_is_announced_and_checked():
    info = ServerInfo("p", 0, 4, capacity=4.7)
    assert ServerInfo.from_record("p", info.to_record()) == info
    for bad in (-1.0, float("nan"), float("inf"), None):
        assert ServerInfo.from_record("p", info.to_record() | {"capacity": bad}) is None
