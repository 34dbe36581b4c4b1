"""Signed DHT records and private swarms: forged announcements are ignored, outsiders are refused."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.serializer import MSGPackSerializer

from swarmtune import records, transport, wire
from swarmtune.client.config import ClientConfig
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.directory import fetch_servers
from swarmtune.local_swarm import LocalSwarm, ProcessFailed
from swarmtune.p2p import NetworkOptions, start_p2p, stop_p2p
from swarmtune.security import Identity, PeerSignatureValidator, SwarmKeyAuthorizer, generate_swarm_key
from swarmtune.transport import ServerRejected
from tests.helpers import reference_model


class _Loop:
    """An event loop in a thread, for peers that tests drive by hand."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def loop():
    loop = _Loop()
    yield loop
    loop.close()


# ---- record signatures ------------------------------------------------------------------------------


def _record(identity: Identity, subkey: str, value: dict) -> DHTRecord:
    record = DHTRecord(b"key", MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), 123.0)
    return record.__class__(record.key, record.subkey, PeerSignatureValidator(identity).sign_value(record),
                            record.expiration_time)


def test_signature_validator(tmp_path):
    alice, mallory = Identity.load_or_create(str(tmp_path / "a")), Identity.load_or_create(str(tmp_path / "m"))
    check = PeerSignatureValidator()
    good = _record(alice, alice.peer_id, {"start": 0})
    assert check.validate(good)
    assert MSGPackSerializer.loads(check.strip_value(good)) == {"start": 0}
    tampered = good.__class__(good.key, good.subkey, good.value.replace(b"\x00", b"\x01", 1), good.expiration_time)
    assert not check.validate(tampered)
    assert not check.validate(good.__class__(good.key, good.subkey, good.value, 999.0))  # expiration is signed
    # mallory cannot sign under alice's subkey: her validator does not sign, and a re-labelled record fails
    unsigned = _record(mallory, alice.peer_id, {"start": 0, "state": "offline"})
    assert not check.validate(unsigned)
    relabelled = _record(mallory, mallory.peer_id, {"state": "offline"})
    relabelled = relabelled.__class__(relabelled.key, good.subkey, relabelled.value, relabelled.expiration_time)
    assert not check.validate(relabelled)
    assert not PeerSignatureValidator(allowed={mallory.peer_id}).validate(good)


def test_swarm_key_authorizer():
    from hivemind.proto import dht_pb2

    member, outsider = SwarmKeyAuthorizer(b"k" * 32), SwarmKeyAuthorizer(b"x" * 32)

    def signed(authorizer):
        request = dht_pb2.PingRequest(validate=True)
        asyncio.run(authorizer.sign_request(request, None))
        return request

    request = signed(member)
    assert asyncio.run(member.validate_request(request))
    assert not asyncio.run(member.validate_request(request)), "a replayed request must be refused"
    assert not asyncio.run(member.validate_request(signed(outsider)))
    stale = signed(member)
    stale.auth.time -= 3600
    assert not asyncio.run(member.validate_request(stale))


def test_forged_announcement_is_ignored(llama_swarm, llama_client, loop):
    """A peer without the validator stores a record in a real server's name: clients keep the real one."""
    victim = llama_swarm.servers[0]
    forged = records.ServerInfo(peer_id=victim.peer_id, start=0, end=6, state="online", throughput=1e6).to_record()

    async def attack():
        p2p = await start_p2p(NetworkOptions(initial_peers=llama_swarm.initial_peers))
        # no validator: it stores anything, and could not read back the signed records (so no cache refresh)
        node = await DHTNode.create(p2p=p2p, initial_peers=llama_swarm.initial_peers, cache_refresh_before_expiry=0)
        keys = [records.block_key(llama_swarm.dht_prefix, i) for i in range(6)]
        await node.store_many(keys, [forged] * 6, get_dht_time() + 60, subkeys=[victim.peer_id] * 6)
        return p2p, node

    p2p, node = loop.run(attack())
    try:
        conn = llama_client.connection
        servers = conn.run(fetch_servers(conn.dht, llama_swarm.dht_prefix, 6), timeout=30)
        assert servers[victim.peer_id].span == victim.span
        assert servers[victim.peer_id].throughput < 1e6
    finally:
        loop.run(node.shutdown())
        loop.run(stop_p2p(p2p))


# ---- private swarms -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm_key(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("keys") / "swarm.key")
    generate_swarm_key(path)
    return path


@pytest.fixture(scope="module")
def private_swarm(tiny_llama, swarm_key):
    with LocalSwarm(tiny_llama, spans=[(0, 3), (3, 6)], swarm_key=swarm_key,
                    dht_options={"swarm_key": swarm_key}) as swarm:
        yield swarm


def _outsider_call(loop, swarm, token: str = "") -> None:
    async def call():
        p2p = await start_p2p(NetworkOptions(initial_peers=swarm.initial_peers))
        try:
            server = swarm.servers[0]
            addrs = [Multiaddr(a.split("/p2p/")[0]) for a in server.maddrs]
            await p2p._client.connect(PeerID.from_base58(server.peer_id), addrs)  # dial it directly
            data = wire.pack({"start": 0, "end": 1}, {"hidden": torch.randn(1, 2, 64)})
            return await transport.call(p2p, swarm.servers[0].peer_id, "forward", data, 20, token=token)
        finally:
            await stop_p2p(p2p)

    with pytest.raises(ServerRejected, match="not a member"):
        loop.run(call())


def _outsider_first_frame(loop, swarm) -> dict:
    """An outsider opens a forward stream and sends the first frame of a many-frame message, holding back
    the rest: the server's answer, which must come without the rest."""
    async def call():
        p2p = await start_p2p(NetworkOptions(initial_peers=swarm.initial_peers))
        hold = asyncio.Event()
        try:
            server = swarm.servers[0]
            addrs = [Multiaddr(a.split("/p2p/")[0]) for a in server.maddrs]
            await p2p._client.connect(PeerID.from_base58(server.peer_id), addrs)

            async def frames():
                yield runtime_pb2.ExpertRequest(uid="", metadata=b"\x01" + bytes(1 << 20))  # "more follows"
                await hold.wait()

            responses = await p2p.iterate_protobuf_handler(PeerID.from_base58(server.peer_id),
                                                           "BlockServicer.rpc_forward_stream", frames(),
                                                           runtime_pb2.ExpertResponse)
            reply = await asyncio.wait_for(responses.__anext__(), 20)
            return wire.unpack(wire.Reassembler().add(reply.metadata))[0]
        finally:
            hold.set()
            await stop_p2p(p2p)

    return loop.run(call())


def test_outsiders_are_refused_on_their_first_frame(private_swarm, loop):
    """Before the server reads (and buffers) the rest of their message."""
    meta = _outsider_first_frame(loop, private_swarm)
    assert "not a member" in meta["error"] and not meta["retry"]


def test_private_swarm_serves_members(private_swarm, swarm_key, tiny_llama):
    config = ClientConfig(initial_peers=private_swarm.initial_peers, swarm_key=swarm_key)
    model = SwarmForCausalLM.from_pretrained(tiny_llama, client_config=config)
    try:
        ids = torch.randint(3, 300, (1, 8))
        with torch.no_grad():
            assert (model(input_ids=ids).logits - reference_model(tiny_llama)(input_ids=ids).logits).abs().max() < 1e-5
    finally:
        model.close()


def test_private_swarm_refuses_outsiders(private_swarm, tiny_llama, loop, tmp_path):
    # DHT reads: an outsider cannot even join the DHT
    with pytest.raises(Exception, match="bootstrap|initial_peers|responded"):
        SwarmForCausalLM.from_pretrained(tiny_llama, initial_peers=private_swarm.initial_peers,
                                         client_config=ClientConfig(startup_timeout=10))
    # RPCs: refused with or without a made-up token
    _outsider_call(loop, private_swarm)
    _outsider_call(loop, private_swarm, token="0" * 64)
    # announcements: a server without the key cannot join
    wrong = str(tmp_path / "wrong.key")
    generate_swarm_key(wrong)
    with pytest.raises(ProcessFailed):
        private_swarm.start_timeout = 60
        private_swarm.add_server((0, 6), swarm_key=wrong)


def test_allowlist_swarm(tiny_llama, tmp_path, loop):
    keys = {name: str(tmp_path / f"{name}.key") for name in ("dht", "s0", "s1", "client")}
    ids = [Identity.load_or_create(path).peer_id for path in keys.values()]
    with LocalSwarm(tiny_llama, spans=[(0, 3), (3, 6)], allowed_peers=ids,
                    per_server=[{"identity": keys["s0"]}, {"identity": keys["s1"]}],
                    dht_options={"allowed_peers": ids, "identity": keys["dht"]}) as swarm:
        config = ClientConfig(initial_peers=swarm.initial_peers, identity_path=keys["client"], allowed_peers=ids)
        model = SwarmForCausalLM.from_pretrained(tiny_llama, client_config=config)
        try:
            assert set(model.connection.view.servers) == {s.peer_id for s in swarm.servers}
            with torch.no_grad():
                model(input_ids=torch.randint(3, 300, (1, 5)))
        finally:
            model.close()
        _outsider_call(loop, swarm)
        with pytest.raises(Exception, match="bootstrap|initial_peers|responded"):
            SwarmForCausalLM.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers,
                                             client_config=ClientConfig(startup_timeout=10))


def test_a_private_swarms_collaboration_admits_only_its_members(swarm_key, tmp_path):
    """The DHT of a collaboration (collab.run_id) started with the swarm's key: a member joins it and reads what
    another stored; a peer without the key, or with another key, cannot even join."""
    from swarmtune.tuning.collab import CollabConfig, start_dht

    first = start_dht(CollabConfig(run_id="bees"), swarm_key)
    started = [first]
    try:
        peers = [str(a) for a in first.get_visible_maddrs()]
        assert first.store("progress", 7, get_dht_time() + 60)
        member = start_dht(CollabConfig(run_id="bees", initial_peers=peers), swarm_key)
        started.append(member)
        assert member.get("progress", latest=True).value == 7
        other_key = str(tmp_path / "other.key")
        generate_swarm_key(other_key)
        for key in (None, other_key):
            with pytest.raises(Exception, match="bootstrap|initial_peers|responded"):
                started.append(start_dht(CollabConfig(run_id="bees", initial_peers=peers), key))
    finally:
        for dht in started:
            dht.shutdown()
