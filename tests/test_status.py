"""`python -m swarmtune.swarm status`: the table of blocks and servers, and its exit status."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from swarmtune import records, swarm
from swarmtune.local_swarm import ManagedProcess
from swarmtune.records import ModelInfo, ServerInfo
from swarmtune.status import format_status, uncovered


def test_the_table_flags_blocks_without_an_online_server():
    model = ModelInfo(6, "org/model", "llama")
    servers = [ServerInfo("peer-aaaaaaaa", 0, 2, throughput=10.0, cache_tokens_left=512),
               ServerInfo("peer-bbbbbbbb", 2, 4, state="joining", throughput=20.0),
               ServerInfo("peer-cccccccc", 4, 6, throughput=30.0),
               ServerInfo("peer-dddddddd", 4, 6, state="offline", throughput=40.0)]
    text = format_status(model, "model", servers)
    assert "6 blocks, 2 of 4 servers online" in text
    rows = {int(line.split()[0]): line for line in text.splitlines()[-12:] if line[:5].strip().isdigit()}
    assert "NO SERVER" in rows[2] and "bbbbbbbb (joining)" in rows[2] and "NO SERVER" in rows[3]
    assert "NO SERVER" not in rows[0] and "aaaaaaaa" in rows[0] and "dddddddd" not in rows[4]
    assert "block(s) 2:4 of org/model" in text.splitlines()[-1]
    assert uncovered(servers, 6) == [2, 3]


def test_model_records_that_claim_absurd_sizes_are_ignored():
    good = ModelInfo(80, "org/model", "llama")
    assert ModelInfo.from_record(good.to_record("model")) == good
    for num_blocks in (0, -3, records.MAX_BLOCKS + 1, 10**6, True, "80"):
        assert ModelInfo.from_record({**good.to_record(), "num_blocks": num_blocks}) is None


def test_status_of_a_running_swarm(llama_swarm, tiny_llama):
    cmd = [sys.executable, "-m", "swarmtune.swarm", "status", "--model", tiny_llama,
           "--initial-peers", *llama_swarm.initial_peers]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # 3 online; other tests may have stopped extra servers whose offline records have not expired yet
    assert re.search(r"6 blocks, 3 of \d+ servers online", done.stdout), done.stdout
    for server in [s for s in llama_swarm.servers if s.proc.poll() is None]:
        start, end = server.span
        assert any(server.peer_id in line and f"{start}:{end}" in line and "online" in line
                   for line in done.stdout.splitlines()), done.stdout
    assert "NO SERVER" not in done.stdout


def test_status_without_a_model_lists_every_model_the_swarm_serves(llama_swarm, tiny_llama, tiny_models, tmp_path):
    """A bloom server joins the llama swarm's DHT: both models are listed, each with its table."""
    bloom = tiny_models("bloom")
    server = ManagedProcess([sys.executable, "-m", "swarmtune.server", "--model", bloom, "--blocks", "0:6",
                             "--initial-peers", *llama_swarm.initial_peers, "--num-threads", "1",
                             "--update-period", "5", "--expiration", "15"], str(tmp_path / "bloom.log"))
    try:
        server.wait_marker("SERVING", 180, "the bloom server")
        done = subprocess.run([sys.executable, "-m", "swarmtune.swarm", "status", "--initial-peers",
                               *llama_swarm.initial_peers], capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 model(s) announced" in done.stdout
    listing = done.stdout.split("\n\n")[0]
    for path in (tiny_llama, bloom):
        prefix = records.dht_prefix(path)
        assert prefix in listing and path in listing
        assert f"{path} (DHT prefix {prefix!r}" in done.stdout  # and its table follows
    assert "bloom" in listing and "llama" in listing


def test_unknown_command_prints_usage():
    with pytest.raises(SystemExit, match="usage: python -m swarmtune.swarm COMMAND") as raised:
        swarm.main(["stats"])
    assert all(f"\n  {command} " in str(raised.value) for command in ("up", "down", "status"))


FAKE_CLAIMS = """
import asyncio, dataclasses, sys
from hivemind.utils import get_dht_time
from swarmtune import records
from swarmtune.p2p import NetworkOptions, start_dht, start_p2p, stop_p2p
from swarmtune.records import ModelInfo
from swarmtune.security import Identity

async def claim(initial_peers, prefix):
    identity = Identity.load_or_create(None)
    opts = NetworkOptions(initial_peers=initial_peers, identity_path=identity.path)
    p2p = await start_p2p(opts)
    dht = await start_dht(p2p, opts, identity=identity)
    lie = ModelInfo(3, "org/fake", "llama")
    stored = await dht.store_many([prefix, records.MODELS_KEY], [lie.to_record(), lie.to_record(prefix)],
                                  expiration_time=get_dht_time() + 30, subkeys=[identity.peer_id] * 2)
    assert all(stored.values()), stored
    await dht.shutdown()
    await stop_p2p(p2p)

for _ in range(4):
    asyncio.run(claim(sys.argv[2:], sys.argv[1]))
"""


def test_peers_that_serve_nothing_cannot_outvote_the_servers_on_the_model(llama_swarm, tiny_llama):
    """Four self-signed records claim the model has 3 blocks (the servers, 3 of them, say 6): status still shows
    6 blocks, with or without the checkpoint, and notes the disagreement where it has the checkpoint."""
    fake = subprocess.run([sys.executable, "-c", FAKE_CLAIMS, llama_swarm.dht_prefix, *llama_swarm.initial_peers],
                          capture_output=True, text=True, timeout=120)
    assert fake.returncode == 0, fake.stderr[-3000:]
    status = [sys.executable, "-m", "swarmtune.swarm", "status", "--initial-peers", *llama_swarm.initial_peers]
    for extra in (["--dht-prefix", llama_swarm.dht_prefix], ["--model", tiny_llama]):
        done = subprocess.run(status + extra, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert re.search(r": 6 blocks, 3 of \d+ servers online", done.stdout), done.stdout
    assert "the swarm's records say 6 blocks" not in done.stdout  # the servers' claim stood
    listed = subprocess.run(status, capture_output=True, text=True, timeout=120)
    assert re.search(rf"{re.escape(llama_swarm.dht_prefix)}\s+6\s+llama", listed.stdout), listed.stdout


FAKE_SERVERS = """
import asyncio, sys
from hivemind.utils import get_dht_time
from swarmtune import records
from swarmtune.p2p import NetworkOptions, start_dht, start_p2p, stop_p2p
from swarmtune.records import ModelInfo, ServerInfo
from swarmtune.security import Identity

async def claim(initial_peers, prefix):
    identity = Identity.load_or_create(None)
    opts = NetworkOptions(initial_peers=initial_peers, identity_path=identity.path)
    p2p = await start_p2p(opts)
    dht = await start_dht(p2p, opts, identity=identity)
    lie = ModelInfo(1024, "org/fake", "llama")
    server = ServerInfo(identity.peer_id, 0, 6, state="online", throughput=1e6).to_record()
    stored = await dht.store_many([prefix, records.MODELS_KEY, records.block_key(prefix, 0)],
                                  [lie.to_record(), lie.to_record(prefix), server],
                                  expiration_time=get_dht_time() + 60, subkeys=[identity.peer_id] * 3)
    assert all(stored.values()), stored
    return p2p, dht

async def main():
    fakes = [await claim(sys.argv[2:], sys.argv[1]) for _ in range(4)]
    print("STORED", flush=True)
    # up, with DHT nodes that hold the records but no server answering, until the test closes our stdin
    await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, sys.stdin.read), 120)
    for p2p, dht in fakes:
        await dht.shutdown()
        await stop_p2p(p2p)

asyncio.run(main())
"""


def test_fake_servers_cannot_outvote_the_reachable_ones_on_the_model(llama_swarm):
    """Four live peers sign a claim of 1,024 blocks and an online server record each, but answer no server call
    (the servers, 3 of them, say 6): status without the checkpoint still shows 6 blocks, the claim of the servers
    that answer."""
    fake = subprocess.Popen([sys.executable, "-c", FAKE_SERVERS, llama_swarm.dht_prefix, *llama_swarm.initial_peers],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout.readline().startswith("STORED")
        done = subprocess.run([sys.executable, "-m", "swarmtune.swarm", "status", "--initial-peers",
                               *llama_swarm.initial_peers, "--dht-prefix", llama_swarm.dht_prefix],
                              capture_output=True, text=True, timeout=120)
    finally:
        fake.stdin.close()  # it shuts its daemons down
        try:
            fake.wait(30)
        except subprocess.TimeoutExpired:
            fake.kill()
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r": 6 blocks, \d+ of \d+ servers online", done.stdout), done.stdout
