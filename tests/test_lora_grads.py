"""Gradients of client-owned adapters through the swarm equal those of a local reference (fp32).

The reference is the same checkpoint as a plain transformers model: wrapped with PEFT for LoRA,
with the soft prompts concatenated to its input embeddings and deep prompts added to the prefix
positions before every decoder layer by forward pre-hooks.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model

from swarmtune.client.model import SwarmForCausalLM
from swarmtune.models.rotary import ATTENTION, MLP
from swarmtune.tuning.module import LoraSettings, OptimConfig, SwarmLM, TuningConfig
from tests.helpers import reference_model

TOL = 1e-5


@pytest.fixture
def swarm_lm(llama_client):
    """A SwarmLM over the shared session client; the client is left without adapters afterwards."""
    yield lambda tuning: SwarmLM(llama_client, tuning, OptimConfig())
    llama_client.lora = None
    llama_client.soft_prompts = None


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows, the second right-padded; labels skip the padding and the first (prompt) tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def randomize(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


class Reference:
    """The local model with the same adapter values as a SwarmLM, computing the same loss."""

    def __init__(self, path: str, module: SwarmLM):
        self.model = reference_model(path)
        self.lora_pairs = {}
        if module.lora is not None:
            lora = module.lora
            config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=sorted({k.split(".", 1)[1]
                                                                                           for k in lora.keys}))
            self.model = get_peft_model(self.model, config)
            layers = self.model.base_model.model.model.layers
            for key in lora.keys:
                block, path = key.split(".", 1)
                target = layers[int(block)].get_submodule(path)
                self.lora_pairs[key] = (target.lora_A["default"].weight, target.lora_B["default"].weight)
            self.copy_lora(module)
        self.prompt = self.deep = None
        if module.soft_prompts is not None:
            prompts = module.soft_prompts
            self.prompt = prompts.prompt.detach().clone().requires_grad_(True) if prompts.prompt is not None else None
            self.deep = prompts.deep.detach().clone().requires_grad_(True) if prompts.deep is not None else None
            self.length = prompts.length
        if self.deep is not None:
            layers = self.model.get_decoder().layers
            for i, layer in enumerate(layers):
                layer.register_forward_pre_hook(self._deep_hook(i), with_kwargs=True)

    def copy_lora(self, module: SwarmLM) -> None:
        with torch.no_grad():
            for key, (a, b) in self.lora_pairs.items():
                ours_a, ours_b = module.lora.pair(key)
                a.copy_(ours_a)
                b.copy_(ours_b)

    @contextlib.contextmanager
    def prompts_off(self):
        """The plain model: no deep prompts added to the blocks' inputs (nor a prompt, which __call__ adds)."""
        deep, self.deep = self.deep, None
        try:
            yield
        finally:
            self.deep = deep

    def _deep_hook(self, i: int):
        def hook(layer, args, kwargs):
            if self.deep is None:
                return None
            h = args[0] if args else kwargs["hidden_states"]
            h = torch.cat([h[:, :self.length] + self.deep[i], h[:, self.length:]], dim=1)
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}
        return hook

    def __call__(self, input_ids, attention_mask, labels):
        embeds = self.model.get_input_embeddings()(input_ids)
        if self.prompt is not None or self.deep is not None:
            batch = input_ids.shape[0]
            prefix = self.prompt.expand(batch, -1, -1) if self.prompt is not None else \
                torch.zeros(batch, self.length, embeds.shape[-1])
            embeds = torch.cat([prefix, embeds], dim=1)
            attention_mask = torch.cat([torch.ones(batch, self.length, dtype=torch.long), attention_mask], dim=1)
            labels = torch.cat([torch.full((batch, self.length), -100), labels], dim=1)
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


@pytest.mark.parametrize("tuning", [
    TuningConfig(lora=LoraSettings(rank=4, alpha=8)),
    TuningConfig(lora=LoraSettings(enabled=False), prompt=True, deep_prompt=True, prefix_length=3),
    TuningConfig(lora=LoraSettings(rank=2, alpha=3, targets=["q_proj", "down_proj"], blocks=[0, 3, 5]),
                 deep_prompt=True, prefix_length=2),
], ids=["lora", "deep_prompt", "lora+deep_prompt"])
def test_gradients_match_local_reference(swarm_lm, tiny_llama, tuning):
    module = swarm_lm(tuning)
    randomize([p for p in module.parameters() if p.requires_grad], seed=1)
    reference = Reference(tiny_llama, module)
    batch = make_batch()

    out = module(**batch)
    out.loss.backward()
    ref = reference(**batch)
    ref.loss.backward()

    assert max_diff(out.logits, ref.logits[:, -out.logits.shape[1]:]) <= TOL  # ours leave out the prefix
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    if module.lora is not None:
        for key in module.lora.keys:
            for ours, theirs in zip(module.lora.pair(key), reference.lora_pairs[key]):
                assert float(ours.grad.abs().max()) > 0, key
                assert max_diff(ours.grad, theirs.grad) <= TOL, key
    if module.soft_prompts is not None:
        prompts = module.soft_prompts
        for ours, theirs in ((prompts.prompt, reference.prompt), (prompts.deep, reference.deep)):
            if ours is not None:
                assert float(ours.grad.abs().max()) > 0
                assert max_diff(ours.grad, theirs.grad) <= TOL


def test_lora_sent_once_per_version(swarm_lm, tiny_llama, llama_client):
    """Backward reuses the forward's LoRA by digest; after an optimizer step the new values are sent."""
    module = swarm_lm(TuningConfig(lora=LoraSettings(rank=4, alpha=8, targets=list(ATTENTION + MLP))))
    randomize(module.lora.parameters(), seed=2)
    reference = Reference(tiny_llama, module)
    optimizer = torch.optim.AdamW(module.lora.parameters(), lr=1e-2)
    stats = llama_client.remote.replayer.stats
    lora_bytes = sum(p.numel() * p.element_size() for p in module.lora.parameters())
    batch = make_batch(seed=3)
    for _ in range(2):
        sent = stats.lora_bytes_sent
        module(**batch).loss.backward()
        assert stats.lora_bytes_sent - sent == lora_bytes  # the forward sends each tensor once; backward none
        optimizer.step()
        optimizer.zero_grad()
    reference.copy_lora(module)
    with torch.no_grad():
        assert max_diff(module(**batch).logits, reference(**batch).logits) <= TOL


def test_lora_dropout_only_in_training(swarm_lm, tiny_llama):
    """As in PEFT, dropout applies in training mode only: validation sees the whole adapter."""
    module = swarm_lm(TuningConfig(lora=LoraSettings(rank=4, alpha=8, dropout=0.3)))
    randomize(module.lora.parameters(), seed=4)
    reference = Reference(tiny_llama, module)
    batch = make_batch(seed=5)
    with torch.no_grad():
        evaluated = module.eval()(**batch).logits
        trained = module.train()(**batch).logits
        expected = reference(**batch).logits
    assert max_diff(evaluated, expected) <= TOL
    assert max_diff(trained, expected) > 1e-4


def test_generation_reuses_the_lora_version_training_sent(swarm_lm, tiny_llama, llama_client):
    """Validation's inference sessions name the adapter by digest when servers hold that version already,
    and resend it when a server forgot it; the tokens are the local model's either way."""
    module = swarm_lm(TuningConfig(lora=LoraSettings(rank=4, alpha=8)))
    randomize(module.lora.parameters(), seed=6)
    reference = Reference(tiny_llama, module)
    lora_bytes = sum(p.numel() * p.element_size() for p in module.lora.parameters())
    prompt = make_batch(seed=7)["input_ids"][:1, :6]
    expected = reference.model.generate(prompt, max_new_tokens=5, do_sample=False)

    def generate_counting() -> int:
        with llama_client.inference_session(max_length=16) as session:
            assert torch.equal(llama_client.generate(prompt, max_new_tokens=5, do_sample=False), expected)
            return session.bytes_sent

    module.eval()
    cold = generate_counting()       # the first session sends the tensors (and servers remember them)
    warm = generate_counting()       # the next names them by digest
    assert cold - warm >= lora_bytes and warm < lora_bytes
    lora, connection = llama_client.lora, llama_client.connection
    with torch.no_grad():
        for p in lora.parameters():
            p.mul_(1.0)  # in place: a new version, which no server holds, but which we claim they do
    for server in connection.view.servers.values():
        connection.lora_shipments.record(server.peer_id, lora.digest(lora.keys_in(server.start, server.end)))
    assert generate_counting() >= lora_bytes  # refused by digest, then sent in full


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_petals_prompt_tuning_spelling(mode, llama_swarm, tiny_llama):
    """from_pretrained(tuning_mode=..., pre_seq_len=N), as in Petals: only the prompts train, and their
    gradients are the local model's."""
    model = SwarmForCausalLM.from_pretrained(tiny_llama, initial_peers=llama_swarm.initial_peers, tuning_mode=mode,
                                             pre_seq_len=3)
    try:
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        assert trainable == ["soft_prompts.prompt"] + (["soft_prompts.deep"] if mode == "deep_ptune" else [])
        randomize([p for p in model.parameters() if p.requires_grad], seed=8)
        reference = Reference(tiny_llama, model)
        batch = make_batch(seed=9)
        loss, ref_loss = model(**batch).loss, reference(**batch).loss
        loss.backward()
        ref_loss.backward()
        assert abs(loss.item() - ref_loss.item()) <= TOL
        for ours, theirs in ((model.soft_prompts.prompt, reference.prompt), (model.soft_prompts.deep, reference.deep)):
            if ours is not None:
                assert float(ours.grad.abs().max()) > 0 and max_diff(ours.grad, theirs.grad) <= TOL
    finally:
        model.close()


def test_petals_spelling_is_checked_before_connecting():
    with pytest.raises(ValueError, match="tuning_mode"):
        SwarmForCausalLM.from_pretrained("unused", tuning_mode="prefix", pre_seq_len=3)
    with pytest.raises(ValueError, match="pre_seq_len"):
        SwarmForCausalLM.from_pretrained("unused", tuning_mode="ptune")
