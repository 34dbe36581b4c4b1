"""A server that returns plausible but wrong results is caught by cross-checking, and results stay correct."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from swarmtune.client.config import ClientConfig
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.local_swarm import LocalSwarm
from tests.helpers import reference_model


@pytest.fixture(scope="module")
def swarm(tiny_llama):
    """Two honest servers and a liar for all blocks; the liar announces itself as the fastest."""
    with LocalSwarm(tiny_llama, spans=[(0, 6), (0, 6), (0, 6)], throughput=1.0,
                    per_server=[{}, {}, {"fault": "perturb=0.05", "throughput": 100.0}]) as swarm:
        yield swarm


@pytest.fixture
def client(swarm, tiny_llama):
    config = ClientConfig(initial_peers=swarm.initial_peers, verify_fraction=1.0, routing_randomness=0.0,
                          ban_base=300.0)
    model = SwarmForCausalLM.from_pretrained(tiny_llama, client_config=config)
    yield model
    model.close()


def test_training_step_outvotes_the_liar(swarm, client, tiny_llama):
    liar = swarm.servers[2].peer_id
    ref = reference_model(tiny_llama)
    ids = torch.randint(3, client.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    embeds = client.parts.embed_tokens(ids).detach().requires_grad_(True)
    out = client(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    ref_embeds = embeds.detach().clone().requires_grad_(True)
    ref_out = ref(inputs_embeds=ref_embeds, labels=ids)
    ref_out.loss.backward()
    assert abs(out.loss.item() - ref_out.loss.item()) < 1e-5
    assert (embeds.grad - ref_embeds.grad).abs().max() < 1e-5
    assert client.connection.bans.banned(liar)
    assert client.remote.replayer.stats.mismatches >= 1


def test_generation_outvotes_the_liar(swarm, client, tiny_llama):
    """Sessions pick a primary and a verifier at random, so the liar joins one within a few sessions."""
    liar = swarm.servers[2].peer_id
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    inputs = tok(["The swarm is a group of computers that"], return_tensors="pt")
    expected = reference_model(tiny_llama).generate(**inputs, max_new_tokens=10, min_new_tokens=10,
                                                     do_sample=False)
    for _ in range(10):
        out = client.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert torch.equal(out, expected)
        if client.connection.bans.banned(liar):
            break
    assert client.connection.bans.banned(liar)
