"""The MoE families (qwen3_moe, glm4_moe, gpt_oss) through a real 2-server swarm equal local transformers/PEFT:
logits and the input-embedding gradient, greedy generation (gpt-oss decoding past its sliding window),
speculative generation, a LoRA step, and generation that survives a server killed mid-way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, get_peft_model

from swarmtune import transport, wire
from swarmtune.adapters.lora import target_shapes
from swarmtune.client.config import ClientConfig
from swarmtune.client.inference import InferenceSession
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.client.speculative import DraftLength
from swarmtune.local_swarm import LocalSwarm
from swarmtune.models.kv_cache import ROLLBACK_TOKENS
from swarmtune.tiny_model import tiny_config
from swarmtune.tuning.module import LoraSettings, OptimConfig, SwarmLM, TuningConfig
from tests.helpers import MOE_FAMILIES, KillAfter, reference_model, wait_until_seen

TOL = 1e-5
PROMPT = torch.tensor([[45, 99, 7]])  # shorter than gpt-oss's tiny window (4): decoding itself crosses it


@dataclass
class Moe:
    family: str
    path: str
    swarm: LocalSwarm
    model: SwarmForCausalLM
    reference: torch.nn.Module


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def moe(request, tiny_models):
    """One family's tiny model on two servers (blocks 0:3 and 3:6), its client and the local reference."""
    path = tiny_models(request.param)
    with LocalSwarm(path, spans=[(0, 3), (3, 6)]) as swarm:
        model = SwarmForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        try:
            yield Moe(request.param, path, swarm, model, reference_model(path))
        finally:
            model.close()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def test_logits_and_input_gradient_match_local(moe: Moe):
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    embeds = moe.model.get_input_embeddings()(ids).detach()
    ours_in, theirs_in = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    ours = moe.model(inputs_embeds=ours_in, attention_mask=mask).logits
    theirs = moe.reference(inputs_embeds=theirs_in, attention_mask=mask).logits
    real = mask.bool()
    assert max_diff(ours[real], theirs[real]) <= TOL
    for logits in (ours, theirs):
        (logits.logsumexp(-1) * real).sum().backward()
    assert float(ours_in.grad.abs().max()) > 0
    assert max_diff(ours_in.grad, theirs_in.grad) <= TOL


def test_greedy_generate_matches_local(moe: Moe):
    if moe.family == "gpt_oss":
        assert PROMPT.shape[1] < moe.reference.config.sliding_window
    kwargs = dict(input_ids=PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(moe.model.generate(**kwargs), moe.reference.generate(**kwargs))


def test_speculative_generate_matches_local(moe: Moe, tiny_models):
    """Drafts of 4 tokens verified by the swarm (rolled back where rejected) give the plain greedy tokens.
    The draft is a random 2-block llama with the same tokenizer: its drafts are rejected, so every round rolls
    the servers' caches back; it has no sliding layers (transformers cannot roll back a local gpt-oss draft's
    sliding cache)."""
    draft = reference_model(tiny_models("llama", layers=2))
    kwargs = dict(input_ids=PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    moe.model.draft_length = DraftLength(min_tokens=4, initial=4, max_tokens=4)
    try:
        assert torch.equal(moe.model.generate(**kwargs, assistant_model=draft), moe.reference.generate(**kwargs))
        assert moe.model.draft_length.drafted_total > moe.model.draft_length.accepted_total
    finally:
        moe.model.draft_length = None


def test_lora_step_matches_peft(moe: Moe):
    """Default targets (attention, plus dense MLPs and shared experts where a block has them): the loss,
    every LoRA gradient, and the logits after one AdamW step equal PEFT on the local model."""
    module = SwarmLM(moe.model, TuningConfig(lora=LoraSettings(rank=4, alpha=8)), OptimConfig())
    try:
        lora = module.lora
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in lora.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        paths = sorted({k.split(".", 1)[1] for k in lora.keys})
        peft_model = get_peft_model(reference_model(moe.path), LoraConfig(r=4, lora_alpha=8, target_modules=paths))
        layers = peft_model.base_model.model.model.layers
        pairs = {}
        for key in lora.keys:
            block, path = key.split(".", 1)
            target = layers[int(block)].get_submodule(path)
            pairs[key] = (target.lora_A["default"].weight, target.lora_B["default"].weight)
            with torch.no_grad():
                for theirs, ours in zip(pairs[key], lora.pair(key)):
                    theirs.copy_(ours)
        assert len(pairs) == sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))

        ids = torch.randint(3, 300, (2, 9), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        ours_opt = torch.optim.AdamW(lora.parameters(), lr=1e-2)
        theirs_opt = torch.optim.AdamW([p for pair in pairs.values() for p in pair], lr=1e-2)
        loss, ref_loss = module(**batch).loss, peft_model(**batch).loss
        loss.backward()
        ref_loss.backward()
        assert abs(loss.item() - ref_loss.item()) <= TOL
        for key, theirs in pairs.items():
            for ours_p, theirs_p in zip(lora.pair(key), theirs):
                assert float(ours_p.grad.abs().max()) > 0, key
                assert max_diff(ours_p.grad, theirs_p.grad) <= TOL, key
        ours_opt.step()
        theirs_opt.step()
        with torch.no_grad():
            assert max_diff(module(**batch).logits, peft_model(**batch).logits) <= TOL
    finally:
        moe.model.lora = None


def test_lora_targets_follow_each_blocks_kind():
    """glm4_moe: block 0 is dense (its MLP is a target), the others have shared experts; a short name
    covers every layer of that name, as in PEFT; a target none of the chosen blocks has is refused."""
    config = tiny_config("glm4_moe")
    keys = set(target_shapes(config))
    assert {"0.mlp.gate_proj", "1.mlp.shared_experts.gate_proj", "5.self_attn.o_proj"} <= keys
    assert "0.mlp.shared_experts.gate_proj" not in keys and "1.mlp.gate_proj" not in keys
    assert set(target_shapes(config, ["gate_proj"], [0, 1])) == {"0.mlp.gate_proj", "1.mlp.shared_experts.gate_proj"}
    with pytest.raises(ValueError, match="'mlp.gate_proj' is in none"):
        target_shapes(config, ["mlp.gate_proj"], [2, 3])
    qwen = tiny_config("qwen3_moe")  # block 1 is dense (mlp_only_layers)
    assert {k for k in target_shapes(qwen) if ".mlp." in k} == {f"1.mlp.{p}" for p in ("gate_proj", "up_proj",
                                                                                     "down_proj")}


@pytest.mark.parametrize("moe", ["gpt_oss"], indirect=True)
def test_gpt_oss_servers_keep_only_the_sliding_window(moe: Moe, tiny_models):
    """A prompt longer than the window and a decode far past what a sliding block keeps (window - 1 +
    ROLLBACK_TOKENS): greedy and speculative generation (every round's drafts rolled back) equal local
    transformers, and a session is charged its full blocks' max_length and its sliding blocks' window only."""
    config = moe.reference.config
    kept = config.sliding_window - 1 + ROLLBACK_TOKENS
    prompt = torch.randint(3, 300, (1, 2 * config.sliding_window), generator=torch.Generator().manual_seed(5))
    kwargs = dict(input_ids=prompt, max_new_tokens=kept + 8, min_new_tokens=kept + 8, do_sample=False)
    expected = moe.reference.generate(**kwargs)
    assert torch.equal(moe.model.generate(**kwargs), expected)
    moe.model.draft_length = DraftLength(min_tokens=4, initial=4, max_tokens=4)
    try:
        assert torch.equal(moe.model.generate(**kwargs, assistant_model=reference_model(tiny_models("llama", 2))),
                           expected)
        assert moe.model.draft_length.drafted_total > moe.model.draft_length.accepted_total
    finally:
        moe.model.draft_length = None

    server, (start, end) = moe.swarm.servers[0], (0, 3)  # blocks 0 and 2 slide, block 1 attends to everything
    per_token = 2 * config.num_key_value_heads * config.head_dim * 4
    conn = moe.model.connection

    def info() -> dict:
        meta, _ = conn.run(transport.call(conn.p2p, server.peer_id, "info", wire.pack({}), 10), timeout=15)
        return meta

    deadline = time.monotonic() + 10  # the generations' sessions close asynchronously
    while (before := info())["active_sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert before["active_sessions"] == 0
    with InferenceSession(conn, max_length=1000, batch_size=1, start=start, end=end) as session:
        session.step(torch.randn(1, 2, config.hidden_size))
        assert before["cache_bytes_free"] - info()["cache_bytes_free"] == per_token * (1000 + 2 * kept)


@pytest.mark.slow  # a third server starts and dies: about a minute on a loaded machine
@pytest.mark.parametrize("moe", ["gpt_oss"], indirect=True)
def test_server_killed_mid_generation_recovers_same_tokens(moe: Moe):
    """A server for all blocks takes the session (one hop beats two) and dies after a few tokens: the
    client replays the prefix on the 2-server chain and the tokens are the local model's."""
    kwargs = dict(input_ids=PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    expected = moe.reference.generate(**kwargs)
    victim = moe.swarm.add_server((0, 6))
    config = ClientConfig(initial_peers=moe.swarm.initial_peers, step_timeout=5.0, ban_base=1.0)
    client = SwarmForCausalLM.from_pretrained(moe.path, client_config=config)
    try:
        wait_until_seen(client, victim.peer_id)
        with client.inference_session(max_length=32) as session:
            out = client.generate(**kwargs, streamer=KillAfter(victim, 5))
            assert len(session.recoveries) == 1
        assert victim.proc.poll() is not None
        assert torch.equal(out, expected)
    finally:
        client.close()
        victim.stop()
