"""Training through a swarm whose servers die, hang or lie: the loss and gradients stay exactly the same."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from swarmtune.client.config import ClientConfig
from swarmtune.client.connection import SwarmConnection
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.client.routing import NoServersError
from swarmtune.client.sequential import RemoteSequential
from swarmtune.local_swarm import LocalSwarm
from swarmtune.models import load_client_parts
from swarmtune.tuning import dpo
from swarmtune.tuning.module import LoraSettings, OptimConfig, SwarmLM, TuningConfig
from tests.test_dpo import local_dpo, preference_batch
from tests.test_lora_grads import Reference, max_diff, randomize

EXACT = 1e-6


@pytest.fixture(scope="module")
def swarm(tiny_llama):
    """Blocks 0:3 and 3:6 on slow-announcing servers; each test adds a preferred (0:6) victim."""
    with LocalSwarm(tiny_llama, spans=[(0, 3), (3, 6)], throughput=1.0) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def parts(tiny_llama):
    return load_client_parts(tiny_llama)


@pytest.fixture(scope="module")
def batch(parts):
    ids = torch.randint(3, parts.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    return parts.embed_tokens(ids).detach()


def _client(swarm, **overrides) -> RemoteSequential:
    options = dict(initial_peers=swarm.initial_peers, routing_randomness=0.0, request_timeout=5.0,
                   retry_budget=30.0, ban_base=1.0)
    conn = SwarmConnection(ClientConfig(**{**options, **overrides}), swarm.dht_prefix)
    return RemoteSequential(conn)


def _loss_and_grad(remote: RemoteSequential, parts, embeds: torch.Tensor, between=None):
    x = embeds.clone().requires_grad_(True)
    loss = parts.logits(remote(x)).logsumexp(-1).mean()
    if between is not None:
        between()
    loss.backward()
    return loss.detach(), x.grad


@pytest.fixture(scope="module")
def baseline(swarm, parts, batch):
    remote = _client(swarm)
    try:
        return _loss_and_grad(remote, parts, batch)
    finally:
        remote.connection.close()


@pytest.fixture
def victim(swarm):
    """A server for all six blocks that announces itself as the fastest, so routing picks it first."""
    servers = []

    def start(**options):
        server = swarm.add_server((0, 6), throughput=100.0, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.resume()
        server.stop()


def _assert_same(result, baseline):
    loss, grad = result
    assert abs(loss - baseline[0]) <= EXACT
    assert (grad - baseline[1]).abs().max() <= EXACT


def test_server_killed_between_forward_and_backward(swarm, parts, batch, baseline, victim):
    target = victim()
    remote = _client(swarm)
    try:
        result = _loss_and_grad(remote, parts, batch, between=lambda: (
            _assert_route(remote, target), target.kill()))
        _assert_same(result, baseline)
        assert remote.replayer.stats.failures >= 1
    finally:
        remote.connection.close()


def _assert_route(remote: RemoteSequential, target) -> None:
    assert [h.peer_id for h in remote.replayer.last_route] == [target.peer_id]


def test_server_killed_during_forward(swarm, parts, batch, baseline, victim):
    target = victim(fault="delay=3")
    remote = _client(swarm, request_timeout=20.0)
    try:
        killer = threading.Timer(1.5, target.kill)
        killer.start()
        started = time.monotonic()
        result = _loss_and_grad(remote, parts, batch)
        killer.join()
        _assert_same(result, baseline)
        assert remote.replayer.stats.failures >= 1
        assert time.monotonic() - started < 15  # no waiting for the 20 s request timeout
    finally:
        remote.connection.close()


def test_server_hangs_during_backward(swarm, parts, batch, baseline, victim):
    target = victim()
    remote = _client(swarm, request_timeout=2.0)
    try:
        def hang():
            _assert_route(remote, target)
            target.suspend()

        started = time.monotonic()
        result = _loss_and_grad(remote, parts, batch, between=hang)
        _assert_same(result, baseline)
        assert remote.replayer.stats.failures >= 1
        assert time.monotonic() - started < 20
    finally:
        target.resume()
        remote.connection.close()


@pytest.mark.parametrize("fault", ["nan", pytest.param("shape", marks=pytest.mark.slow)])  # a victim each
def test_bad_outputs_count_as_failures(swarm, parts, batch, baseline, victim, fault):
    victim(fault=fault)
    remote = _client(swarm)
    try:
        _assert_same(_loss_and_grad(remote, parts, batch), baseline)
        assert remote.replayer.stats.failures >= 1
        assert all(h.end - h.start == 3 for h in remote.replayer.last_route)  # the liar was routed around
    finally:
        remote.connection.close()


@pytest.mark.slow  # a victim and a DPO model of its own; the DPO step on a swarm: test_dpo
def test_server_killed_in_a_dpo_step(swarm, tiny_llama, victim):
    """The fast server serves both forward passes of a DPO step (the reference's and the policy's), then dies
    before the backward: the replay on the others gives the local PEFT model's loss and LoRA gradients."""
    target = victim()
    options = dict(initial_peers=swarm.initial_peers, routing_randomness=0.0, request_timeout=5.0,
                   retry_budget=30.0, ban_base=1.0)
    model = SwarmForCausalLM.from_pretrained(tiny_llama, client_config=ClientConfig(**options),
                                             dht_prefix=swarm.dht_prefix)
    try:
        module = SwarmLM(model, TuningConfig(lora=LoraSettings(rank=4, alpha=8), objective="dpo"), OptimConfig())
        randomize(module.lora.parameters(), seed=3)
        reference = Reference(tiny_llama, module)
        batch = preference_batch(tiny_llama)
        loss, _ = dpo.step(model, batch, beta=0.1)
        _assert_route(model.remote, target)
        target.kill()
        loss.backward()
        assert model.remote.replayer.stats.failures >= 1
        ref_loss, _ = local_dpo(reference, batch)
        ref_loss.backward()
        assert abs(loss.item() - ref_loss.item()) <= 1e-5
        for key in module.lora.keys:
            for ours, theirs in zip(module.lora.pair(key), reference.lora_pairs[key]):
                assert max_diff(ours.grad, theirs.grad) <= 1e-5, key
    finally:
        model.close()


def test_no_server_left_for_a_block_raises_within_budget(swarm, parts, batch):
    """Kills the module swarm's only server for blocks 3:6, so it stays the file's last test."""
    remote = _client(swarm, retry_budget=3.0)
    try:
        swarm.servers[1].kill()  # the only server for blocks 3:6
        started = time.monotonic()
        with pytest.raises(NoServersError, match="3:6"):
            _loss_and_grad(remote, parts, batch)
        assert time.monotonic() - started < 3.0 + 10
    finally:
        remote.connection.close()
