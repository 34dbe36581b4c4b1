"""Real server processes on loopback: remote forward/backward equal the local model, and bad requests are refused."""

from __future__ import annotations

import time

import msgpack
import psutil
import pytest
import torch

from swarmtune import transport, wire
from swarmtune.client.config import ClientConfig
from swarmtune.client.connection import SwarmConnection
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.client.routing import NoServersError
from swarmtune.client.sequential import RemoteSequential
from swarmtune.transport import ServerRejected
from tests.helpers import reference_model

TOL = 1e-5


def _batch(vocab: int, batch: int = 2, length: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    return ids, mask


def _check_against_local(client: SwarmForCausalLM, path: str) -> None:
    ref = reference_model(path)
    ids, mask = _batch(client.config.vocab_size)
    labels = ids.masked_fill(mask == 0, -100)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    embeds = client.parts.embed_tokens(ids).detach().requires_grad_(True)
    out = client(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, labels=labels)
    out.loss.backward()

    ref_embeds = embeds.detach().clone().requires_grad_(True)
    ref_out = ref(inputs_embeds=ref_embeds, attention_mask=mask, position_ids=pos, labels=labels)
    ref_out.loss.backward()

    real = mask.bool()
    assert (out.logits - ref_out.logits)[real].abs().max() <= TOL
    assert abs(out.loss.item() - ref_out.loss.item()) <= TOL
    assert (embeds.grad - ref_embeds.grad).abs().max() <= TOL
    assert embeds.grad.abs().sum() > 0


def test_llama_matches_local(llama_client, tiny_llama):
    _check_against_local(llama_client, tiny_llama)


def test_unpadded_forward_matches_local(llama_client, tiny_llama):
    ref = reference_model(tiny_llama)
    ids = torch.randint(3, llama_client.config.vocab_size, (3, 7))
    with torch.no_grad():
        assert (llama_client(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max() <= TOL


def test_bloom_matches_local(bloom_client):
    model, path = bloom_client
    _check_against_local(model, path)


def test_request_above_unary_limit_streams(llama_client, tiny_llama, monkeypatch):
    """Requests reuse a channel per server, in frames: a message above one RPC's limit round-trips."""
    sizes = []
    original = transport.Channel.request

    async def spy(self, data, timeout):
        sizes.append(len(data))
        return await original(self, data, timeout)

    monkeypatch.setattr(transport.Channel, "request", spy)
    hidden = torch.randn(4, 1100, llama_client.config.hidden_size)  # ~1.1 MiB of fp32 per request
    ref = reference_model(tiny_llama)
    with torch.no_grad():
        out = llama_client.remote(hidden)
        expected = hidden
        for layer in ref.model.layers:
            pos = torch.arange(hidden.shape[1])[None]
            expected = layer(expected, position_embeddings=ref.model.rotary_emb(expected, pos), position_ids=pos)
    assert any(n > wire.CHUNK_BYTES for n in sizes)
    assert (out - expected).abs().max() <= 1e-4


def _good_request(hidden_size: int, start: int, end: int) -> tuple[dict, dict]:
    return {"start": start, "end": end}, {"hidden": torch.randn(1, 4, hidden_size)}


BAD_REQUESTS = {
    "bad shape": lambda h: ({"start": 0, "end": 1}, {"hidden": torch.randn(1, 4, h + 1)}),
    "bad rank": lambda h: ({"start": 0, "end": 1}, {"hidden": torch.randn(4, h)}),
    "bad dtype": lambda h: ({"start": 0, "end": 1}, {"hidden": torch.ones(1, 4, h, dtype=torch.int64)}),
    "missing hidden": lambda h: ({"start": 0, "end": 1}, {}),
    "block outside the model": lambda h: ({"start": 0, "end": 1000}, {"hidden": torch.randn(1, 4, h)}),
    "negative block": lambda h: ({"start": -1, "end": 1}, {"hidden": torch.randn(1, 4, h)}),
    "block ids not ints": lambda h: ({"start": "0", "end": 1.5}, {"hidden": torch.randn(1, 4, h)}),
    "nan input": lambda h: ({"start": 0, "end": 1}, {"hidden": torch.full((1, 4, h), float("nan"))}),
    "mask values": lambda h: ({"start": 0, "end": 1}, {"hidden": torch.randn(1, 4, h),
                                                       "attention_mask": torch.full((1, 4), 7)}),
    "mask shape": lambda h: ({"start": 0, "end": 1}, {"hidden": torch.randn(1, 4, h),
                                                      "attention_mask": torch.ones(2, 9, dtype=torch.long)}),
    "positions": lambda h: ({"start": 0, "end": 1}, {"hidden": torch.randn(1, 4, h),
                                                     "position_ids": -torch.ones(1, 4, dtype=torch.long)}),
    "too many tokens": lambda h: ({"start": 0, "end": 1}, {"hidden": torch.randn(1, 20000, h)}),
    "lora garbage": lambda h: ({"start": 0, "end": 1, "lora": {"keys": ["0.nope"], "scale": 1.0}},
                               {"hidden": torch.randn(1, 4, h), "lora.A.0": torch.ones(2, 2),
                                "lora.B.0": torch.ones(2, 2)}),
}


def _raw(meta: dict, specs: list) -> bytes:
    """A message whose header says what `wire.pack` never would."""
    header = msgpack.packb({"meta": meta, "tensors": specs})
    return len(header).to_bytes(4, "little") + header


def test_malformed_requests_are_refused_and_server_keeps_serving(llama_swarm, llama_client):
    server = llama_swarm.servers[0]  # serves block 0
    hidden_size = llama_client.config.hidden_size
    conn = llama_client.connection

    def send(method: str, data: bytes):
        return conn.run(transport.call(conn.p2p, server.peer_id, method, data, 30), timeout=40)

    for name, make in BAD_REQUESTS.items():
        meta, tensors = make(hidden_size)
        with pytest.raises(ServerRejected) as err:
            send("forward", wire.pack(meta, tensors))
        assert err.value.reason and not err.value.retry, name  # the client's error: no other server is tried
    with pytest.raises(ServerRejected, match="not served here") as err:  # a stale view: another server has them
        send("forward", wire.pack({"start": 0, "end": 2}, {"hidden": torch.randn(1, 4, hidden_size)}))
    assert err.value.retry
    garbage = [b"", b"\x00\x01", b"\xff" * 64, (10).to_bytes(4, "little") + b"not msgpack",
               wire.pack({"start": 0, "end": 1}, {"hidden": torch.randn(1, 4, hidden_size)})[:-7],
               _raw({"start": 0, "end": 1}, [["hidden", "float32", [1, True, hidden_size]]]),  # a bool as a size
               _raw({"start": 0, "end": 1}, [["hidden", "float32", [2**31 - 1] * 7 + [0]]]),  # strides overflow
               _raw({"start": 0, "end": 1}, [{}] * 200_000),                               # a header bomb
               _raw({"start": 0, "end": 1, "x": [[[]] * 8000] * 8}, [])]                    # nested, within limits
    for data in garbage:
        for method in ("forward", "backward"):
            with pytest.raises(ServerRejected) as err:
                send(method, data)
            assert not err.value.retry, err.value.reason
    meta, tensors = _good_request(hidden_size, 0, 1)
    with pytest.raises(ServerRejected, match="grad_output"):
        send("backward", wire.pack(meta, tensors))
    _, reply = send("forward", wire.pack(meta, tensors))
    assert reply["hidden"].shape == (1, 4, hidden_size)
    assert server.proc.poll() is None


def test_missing_blocks_give_clear_error(llama_swarm):
    config = ClientConfig(initial_peers=llama_swarm.initial_peers, retry_budget=1.0)
    conn = SwarmConnection(config, llama_swarm.dht_prefix, num_blocks=8)  # blocks 6 and 7 have no server
    try:
        remote = RemoteSequential(conn)
        started = time.monotonic()
        with pytest.raises(NoServersError, match="6:8"):
            remote(torch.randn(1, 3, 64))
        assert time.monotonic() - started < 15
    finally:
        conn.close()


def test_sigterm_withdraws_announcement_and_leaves_no_daemon(llama_swarm, llama_client):
    server = llama_swarm.add_server((0, 6))
    conn = llama_client.connection
    conn.refresh()
    assert server.peer_id in conn.view.servers
    children = psutil.Process(server.pid).children(recursive=True)
    assert children, "the server should run its own p2pd"
    assert server.stop() == 0
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    conn.refresh()
    assert server.peer_id not in conn.view.servers


def test_backward_reuses_the_kept_forward_graph(llama_swarm, llama_client):
    """Servers keep a forward's graph when a backward will follow, and then do not recompute the forward."""
    conn = llama_client.connection

    def kept_backwards() -> int:
        total = 0
        for server in llama_swarm.servers:
            if server.proc.poll() is None:
                info = transport.call(conn.p2p, server.peer_id, "info", wire.pack({}), 10, token=conn.token)
                meta, _ = conn.run(info, timeout=15)
                total += meta["stats"].get("backward_from_kept_graph", 0)
        return total

    before = kept_backwards()
    with torch.no_grad():  # no backward follows: nothing is kept
        llama_client.remote(torch.randn(1, 5, llama_client.config.hidden_size))
    x = torch.randn(2, 5, llama_client.config.hidden_size, requires_grad=True)
    llama_client.remote(x).square().sum().backward()
    assert kept_backwards() - before == len(llama_client.remote.replayer.last_route)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_new_swarm_server_is_its_own_bootstrap(tiny_llama, tmp_path):
    """`--new-swarm`: the first server needs no bootstrap peer; a second server and a client join through it."""
    import sys

    from swarmtune.local_swarm import ManagedProcess

    def server(blocks: str, *extra: str) -> ManagedProcess:
        args = [sys.executable, "-m", "swarmtune.server", "--model", tiny_llama, "--blocks", blocks,
                "--num-threads", "1", *extra]
        return ManagedProcess(args, str(tmp_path / f"server-{blocks.replace(':', '-')}.log"))

    first = server("0:3", "--new-swarm")
    second = None
    try:
        peers = first.wait_marker("MADDR", 120, "the --new-swarm server")
        first.wait_marker("SERVING", 120, "the --new-swarm server")
        second = server("3:6", "--initial-peers", *peers)
        second.wait_marker("SERVING", 120, "the joining server")
        model = SwarmForCausalLM.from_pretrained(tiny_llama, initial_peers=peers)
        try:
            ids = torch.randint(3, model.config.vocab_size, (1, 6))
            with torch.no_grad():
                assert (model(input_ids=ids).logits - reference_model(tiny_llama)(input_ids=ids).logits
                        ).abs().max() <= TOL
        finally:
            model.close()
    finally:
        for process in (second, first):
            if process is not None:
                process.stop()
