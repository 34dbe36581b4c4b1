"""Inference sessions survive dying servers (dual attention cache), respect KV budgets and do not leak."""

from __future__ import annotations

import threading
import time

import psutil
import pytest
import torch
from transformers import AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from swarmtune import transport, wire
from swarmtune.client.config import ClientConfig
from swarmtune.client.inference import InferenceSession
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.client.span_requests import RequestRefused
from swarmtune.local_swarm import LocalSwarm
from tests.helpers import KillAfter, reference_model

PROMPT = "The swarm is a group of computers that"


@pytest.fixture(scope="module")
def swarm(tiny_llama):
    with LocalSwarm(tiny_llama, spans=[(0, 3), (3, 6)], per_server=[{"cache_mb": 1}, {}]) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def expected(tiny_llama, tokenizer):
    inputs = tokenizer([PROMPT], return_tensors="pt")
    return reference_model(tiny_llama).generate(**inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False)


@pytest.fixture
def client(swarm, tiny_llama):
    config = ClientConfig(initial_peers=swarm.initial_peers, step_timeout=5.0, ban_base=1.0)
    model = SwarmForCausalLM.from_pretrained(tiny_llama, client_config=config)
    yield model
    model.close()


@pytest.fixture
def victim(swarm):
    """A server for all blocks: inference routing prefers one hop over two, so sessions start on it."""
    server = swarm.add_server((0, 6))
    yield server
    if server.proc.poll() is None:
        server.resume()
    server.stop()


def test_server_killed_between_generate_calls(victim, client, tokenizer, expected):
    inputs = tokenizer([PROMPT], return_tensors="pt")
    with client.inference_session(max_length=64) as session:
        first = client.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert [s.hop.peer_id for s in session.spans] == [victim.peer_id]
        victim.kill()
        second = client.generate(first, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert victim.peer_id not in [s.hop.peer_id for s in session.spans]
        assert len(session.recoveries) == 1
    assert torch.equal(second, expected)


def test_server_killed_during_generate(victim, client, tokenizer, expected):
    inputs = tokenizer([PROMPT], return_tensors="pt")
    out = client.generate(**inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          streamer=KillAfter(victim, 8))
    assert victim.proc.poll() is not None
    assert torch.equal(out, expected)


def test_server_hangs_during_generate(victim, client, tokenizer, expected):
    inputs = tokenizer([PROMPT], return_tensors="pt")
    streamer = KillAfter(victim, 8)
    streamer.server = type("Hang", (), {"kill": victim.suspend})()
    out = client.generate(**inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False, streamer=streamer)
    assert torch.equal(out, expected)


def test_server_killed_with_a_step_in_flight(swarm, tiny_llama, tokenizer, expected):
    """The daemon does not report a dead server's stream: the client's probes must, well before the step timeout."""
    slow = swarm.add_server((0, 6), fault="delay=1")
    config = ClientConfig(initial_peers=swarm.initial_peers, step_timeout=60.0, ban_base=1.0)
    model = SwarmForCausalLM.from_pretrained(tiny_llama, client_config=config)
    try:
        killer = threading.Timer(2.5, slow.kill)  # lands inside a 1 s step
        killer.start()
        started = time.monotonic()
        out = model.generate(**tokenizer([PROMPT], return_tensors="pt"), max_new_tokens=24, min_new_tokens=24,
                             do_sample=False)
        killer.join()
        assert torch.equal(out, expected)
        assert 2.5 < time.monotonic() - started < 30  # it ran on the slow server, and did not wait for the timeout
    finally:
        model.close()
        slow.stop()


def test_session_larger_than_cache_budget_is_refused(client):
    # the 0:3 server has 1 MiB of KV cache; 4 x 4096 tokens need far more
    with pytest.raises(RequestRefused, match="cache budget"), \
            client.inference_session(max_length=4096, batch_size=4) as session:
        session.step(torch.zeros(4, 1, client.config.hidden_size))


def _server_state(model: SwarmForCausalLM, peer_id: str) -> dict:
    conn = model.connection
    meta, _ = conn.run(transport.call(conn.p2p, peer_id, "info", wire.pack({}), 10), timeout=15)
    return meta


def test_many_sessions_do_not_leak(client, swarm):
    server = swarm.servers[1]
    hidden = torch.randn(1, 4, client.config.hidden_size)

    def run_sessions(count: int) -> None:
        for _ in range(count):
            with InferenceSession(client.connection, max_length=16, batch_size=1, start=3, end=6) as session:
                session.step(hidden)

    run_sessions(50)  # warm up allocator pools and caches
    baseline = psutil.Process(server.pid).memory_info().rss
    run_sessions(500)
    deadline = time.monotonic() + 10  # the last close reaches the server asynchronously
    while (state := _server_state(client, server.peer_id))["active_sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state["active_sessions"] == 0
    assert state["cache_bytes_free"] == 256 << 20
    growth = psutil.Process(server.pid).memory_info().rss - baseline
    assert growth < 30 << 20, f"server RSS grew by {growth / 2**20:.1f} MiB over 500 sessions"


@pytest.mark.slow  # a swarm of its own (chained steps: test_speculative)
def test_chained_server_killed_mid_generation(tiny_llama, tokenizer, expected):
    """Servers pass each step along the chain; when the second one dies, the step finishes through a replacement."""
    with LocalSwarm(tiny_llama, spans=[(0, 3), (3, 6), (3, 6)]) as swarm:
        config = ClientConfig(initial_peers=swarm.initial_peers, step_timeout=5.0, ban_base=1.0, chaining=True)
        model = SwarmForCausalLM.from_pretrained(tiny_llama, client_config=config)
        try:
            sessions = []
            original = model.open_session

            def remember(*args, **kwargs):
                sessions.append(original(*args, **kwargs))
                return sessions[-1]

            model.open_session = remember

            class KillSecond(BaseStreamer):
                seen = 0

                def put(self, value):
                    self.seen += 1
                    if self.seen == 8:
                        second = sessions[0].spans[1].hop.peer_id
                        next(s for s in swarm.servers if s.peer_id == second).kill()

                def end(self):
                    pass

            inputs = tokenizer([PROMPT], return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                 streamer=KillSecond())
            assert torch.equal(out, expected)
            assert len(sessions[0].recoveries) == 1
            alive = [s for s in swarm.servers if s.proc.poll() is None]
            assert sum(_server_state(model, s.peer_id)["stats"].get("pushes_received", 0) for s in alive) > 0
        finally:
            model.close()


def test_truncating_past_a_sliding_blocks_window_is_the_clients_error(tiny_models):
    """A gpt-oss session (sliding blocks keep window - 1 + ROLLBACK_TOKENS tokens) that has moved on rolls back
    ROLLBACK_TOKENS, and a request to go further back is refused as the client's error, its cache unchanged."""
    from swarmtune.models import load_span
    from swarmtune.models.kv_cache import ROLLBACK_TOKENS
    from swarmtune.server.requests import RequestError
    from swarmtune.server.sessions import CacheEdits, Lease, ServerSession

    span = load_span(tiny_models("gpt_oss"), 0, 2)
    session = ServerSession(span, 1, 100, None, None, Lease("peer", 0, None))
    hidden = torch.randn(1, 60, span.config.hidden_size)
    session.step(hidden, None, None)
    back = 60 - ROLLBACK_TOKENS
    with pytest.raises(RequestError, match="shortest"):
        session.step(hidden[:, :1], None, None, CacheEdits(truncate=back - 1))
    assert session.length == 60
    session.step(hidden[:, back:back + 1], None, None, CacheEdits(truncate=back))
    assert session.length == back + 1


def test_traced_steps_report_ordered_stamps(swarm, tiny_llama):
    """A session that asks for traces gets, per hop, stamps in the order the server took them, all between the
    client's own stamps of the step (one clock on one machine), and the same outputs as without them."""
    config = ClientConfig(initial_peers=swarm.initial_peers, step_timeout=5.0, chaining=False)
    model = SwarmForCausalLM.from_pretrained(tiny_llama, client_config=config)
    token, outs = torch.randn(1, 1, model.config.hidden_size), []
    try:
        for trace in (False, True):
            with model.open_session(max_length=8) as session:
                session.trace = trace
                began = time.perf_counter_ns()
                outs.append(session.step(token))
                ended = time.perf_counter_ns()
                if not trace:
                    assert all(span.trace is None for span in session.spans)
                    continue
                previous = began
                for span in session.spans:
                    stamps = [span.stream.sent_ns, *span.trace, span.stream.received_ns]
                    assert len(stamps) == 7 and previous <= stamps[0], stamps
                    assert stamps == sorted(stamps), stamps
                    previous = stamps[-1]
                assert previous <= ended
    finally:
        model.close()
    assert torch.equal(outs[0], outs[1])
