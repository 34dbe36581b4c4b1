"""DPO through the swarm equals DPO on the same model run locally with PEFT (fp32): the loss, the rewards and
the adapter's gradients; the reference is the swarm with the adapter off; a few steps teach the tiny model
the bundled preferences, and the exported adapter, loaded with plain PEFT, prefers the held-out chosen answers."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from peft import PeftModel
from transformers import AutoTokenizer

from swarmtune.adapters import peft_format
from swarmtune.server.requests import Limits
from swarmtune.tuning import dpo
from swarmtune.tuning.data import IGNORE, DataConfig, InstructionDataModule, collate, load_raw, tokenize_row
from swarmtune.tuning.evaluation import preference_scores
from swarmtune.tuning.module import LoraSettings, OptimConfig, SwarmLM, TuningConfig
from tests.helpers import reference_model
from tests.test_lora_grads import Reference, max_diff, randomize

TOL = 1e-5
BETA = 0.1
PREFERENCE = "pkg://swarmtune.assets/tiny_preference.jsonl"


@pytest.fixture(scope="module")
def pairs(tiny_llama) -> InstructionDataModule:
    """The bundled pairs, 4 to a batch (8 rows: chosen, then rejected), split as training splits them."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    dm = InstructionDataModule(DataConfig(path=PREFERENCE, format="preference", batch_size=4, val_fraction=0.1,
                                          max_val_samples=8), tokenizer)
    dm.setup("fit")
    return dm


def preference_batch(model_path: str, pairs: int = 3) -> dict[str, torch.Tensor]:
    """The first bundled pairs as a batch: 2 * `pairs` rows, the chosen answers first."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    cfg = DataConfig(path=PREFERENCE, format="preference")
    rows = [tokenize_row(row, tokenizer, cfg) for row in load_raw(cfg)["train"].select(range(pairs))]
    return collate(rows, tokenizer.pad_token_id)


@pytest.fixture
def swarm_lm(llama_client):
    """A SwarmLM over the shared session client; the client is left without adapters afterwards."""
    yield lambda tuning: SwarmLM(llama_client, tuning, OptimConfig())
    llama_client.lora = None
    llama_client.soft_prompts = None


def peft_margins(model_path: str, adapter: str, pairs: InstructionDataModule, beta: float) -> list[float]:
    """DPO's reward margin of `adapter` on each validation pair, with plain PEFT: the policy with the adapter, the
    reference with it disabled."""
    model = PeftModel.from_pretrained(reference_model(model_path), adapter).eval()
    margins = []
    with torch.no_grad():
        for batch in pairs.eval_dataloader("validation"):
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            policy = plain_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
            with model.disable_adapter():
                reference = plain_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
            chosen, rejected = (beta * (policy - reference)).chunk(2)
            margins += (chosen - rejected).tolist()
    return margins


def pairs_preferred(model_path: str, adapter: str, pairs: InstructionDataModule | None = None,
                    beta: float = BETA) -> tuple[float, float]:
    """Reward accuracy and mean margin of `adapter` on the held-out bundled pairs (as training splits them, seed
    0), with plain PEFT."""
    if pairs is None:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        pairs = InstructionDataModule(DataConfig(path=PREFERENCE, format="preference", val_fraction=0.1,
                                                 max_val_samples=16), tokenizer)
    margins = peft_margins(model_path, adapter, pairs, beta)
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def plain_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(answer | prompt) per row, written out plainly (log-softmax, gather, masked sum)."""
    logps = torch.log_softmax(logits[:, :-1].float(), -1)
    targets = labels[:, 1:]
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE)).sum(-1)


def plain_dpo(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's loss (Rafailov et al., eq. 7) and the chosen-minus-rejected reward margin, mean over pairs."""
    n = policy.shape[0] // 2
    chosen, rejected = policy[:n] - reference[:n], policy[n:] - reference[n:]
    return -F.logsigmoid(beta * (chosen - rejected)).mean(), (beta * (chosen - rejected)).mean()


def local_dpo(reference: Reference, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO on the local PEFT model: the policy with its adapter, the reference with PEFT's adapter disabled
    (for soft prompts: the plain model without them)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    logits = reference(ids, mask, labels).logits[:, -ids.shape[1]:]
    off = reference.model.disable_adapter() if isinstance(reference.model, PeftModel) else reference.prompts_off()
    with torch.no_grad(), off:
        ref_logits = reference.model(input_ids=ids, attention_mask=mask).logits
    return plain_dpo(plain_logps(logits, labels), plain_logps(ref_logits, labels), BETA)


@pytest.mark.parametrize("tuning", [
    TuningConfig(lora=LoraSettings(rank=4, alpha=8), objective="dpo"),
    TuningConfig(lora=LoraSettings(enabled=False), prompt=True, prefix_length=3, objective="dpo"),
    TuningConfig(lora=LoraSettings(enabled=False), deep_prompt=True, prefix_length=3, objective="dpo"),
], ids=["lora", "prompt", "deep_prompt"])
def test_loss_and_gradients_match_local_peft(swarm_lm, tiny_llama, pairs, tuning):
    module = swarm_lm(tuning)
    randomize([p for p in module.parameters() if p.requires_grad], seed=1)
    reference = Reference(tiny_llama, module)
    batch = next(iter(pairs.val_dataloader()))

    loss, metrics = dpo.step(module.model, batch, BETA)
    loss.backward()
    ref_loss, ref_margin = local_dpo(reference, batch)
    ref_loss.backward()

    assert abs(loss.item() - ref_loss.item()) <= TOL and abs(loss.item() - math.log(2)) > 1e-3
    assert abs(metrics["reward_margin"].item() - ref_margin.item()) <= TOL
    assert abs((metrics["rewards_chosen"] - metrics["rewards_rejected"]).item() - ref_margin.item()) <= TOL
    if module.lora is not None:
        ours = [p for key in module.lora.keys for p in module.lora.pair(key)]
        theirs = [t for key in module.lora.keys for t in reference.lora_pairs[key]]
    else:
        prompts = module.soft_prompts
        ours, theirs = [p for p in (prompts.prompt, prompts.deep) if p is not None], \
            [p for p in (reference.prompt, reference.deep) if p is not None]
    for p, q in zip(ours, theirs):
        assert float(p.grad.abs().max()) > 0 and max_diff(p.grad, q.grad) <= TOL
    assert module.model.lora is module.lora and module.model.soft_prompts is module.soft_prompts  # back on


def test_the_first_loss_is_ln2_and_the_reference_sends_no_adapter(swarm_lm, pairs, llama_client):
    """A fresh LoRA is the identity: policy and reference agree, so the loss is ln 2 and the rewards zero. The
    reference pass carries no LoRA tensors and keeps nothing on the servers for a backward."""
    swarm_lm(TuningConfig(lora=LoraSettings(rank=4, alpha=8), objective="dpo"))  # a fresh LoRA on the client
    batch = next(iter(pairs.train_dataloader()))
    stats = llama_client.remote.replayer.stats
    sent = stats.lora_bytes_sent
    with torch.no_grad():
        reference = dpo.reference_logps(llama_client, batch)
    assert stats.lora_bytes_sent == sent
    loss, metrics = dpo.step(llama_client, batch, BETA)
    assert abs(loss.item() - math.log(2)) <= 1e-6
    assert all(abs(v.item()) <= 1e-6 for v in metrics.values())
    with torch.no_grad():
        policy = dpo.sequence_logps(llama_client(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits, batch["labels"])
    # all logits here, the answers' alone in DPO's passes: the same sums, but for float32's rounding
    assert max_diff(policy, reference) <= 1e-6 * float(reference.abs().max()) and (reference < 0).all()


def test_passes_in_turn_equal_passes_beside(swarm_lm, pairs, monkeypatch):
    """A batch too large for both passes in flight at once (by what the servers announce) runs them in turn, to
    the same loss and gradients."""
    module = swarm_lm(TuningConfig(lora=LoraSettings(rank=4, alpha=8), objective="dpo"))
    randomize(list(module.lora.parameters()), seed=2)
    batch = next(iter(pairs.val_dataloader()))
    with torch.no_grad():
        dpo.step(module.model, batch, BETA)  # the client has met the swarm's servers
    assert dpo.tokens_in_flight(module.model) == Limits().max_tokens_in_flight_per_peer
    results = []
    for limit in (dpo.tokens_in_flight(module.model), 0):
        monkeypatch.setattr(dpo, "tokens_in_flight", lambda model, limit=limit: limit)
        loss, _ = dpo.step(module.model, batch, BETA)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.lora.parameters()]))
        module.lora.zero_grad()
    (beside, grads_beside), (in_turn, grads_in_turn) = results
    assert abs(beside.item() - math.log(2)) > 1e-3 and max_diff(beside, in_turn) <= 1e-6
    assert all(max_diff(a, b) <= 1e-6 and float(a.abs().max()) > 0 for a, b in zip(grads_beside, grads_in_turn))


def test_training_prefers_chosen_answers_with_plain_peft(llama_client, tiny_llama, pairs, tmp_path):
    """A dozen Lightning steps of DPO with LoRA: the logged loss starts at ln 2 with the metrics named; the exported
    adapter, loaded with plain PEFT, gives the held-out chosen answers the higher reward, as the swarm does."""
    torch.manual_seed(0)  # the adapter's initialization: not whatever the tests before left the generator at
    tuning = TuningConfig(lora=LoraSettings(rank=4, alpha=8), objective="dpo", beta=BETA)
    module = SwarmLM(llama_client, tuning, OptimConfig(lr=1e-2, scheduler="constant"))
    logger = CSVLogger(str(tmp_path), name="", version="")
    trainer = L.Trainer(max_steps=12, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0)
    try:
        trainer.fit(module, datamodule=pairs)
        adapter = module.export(str(tmp_path / "adapter"))
        llama_client.eval()
        swarm_scores = preference_scores(llama_client, pairs.val_dataloader(), BETA)
    finally:
        llama_client.lora = None
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header, first = rows[0].split(","), dict(zip(rows[0].split(","), rows[1].split(",")))
    assert {"train/loss", "train/reward_accuracy", "train/reward_margin", "train/rewards_chosen",
            "train/rewards_rejected"} <= set(header)
    assert abs(float(first["train/loss"]) - math.log(2)) <= 1e-6

    accuracy, margin = pairs_preferred(tiny_llama, adapter, pairs)
    assert accuracy >= 0.9 and margin > 0.05
    assert abs(swarm_scores["reward_margin"] - margin) <= 1e-4 and swarm_scores["reward_accuracy"] == accuracy


def test_prompt_tuning_with_dpo_exports_its_prompts(swarm_lm, tiny_llama, pairs, tmp_path):
    """DPO trains soft prompts too (the reference has none); what is exported loads back to the same rewards."""
    module = swarm_lm(TuningConfig(lora=LoraSettings(enabled=False), prompt=True, prefix_length=4,
                                   objective="dpo"))
    optimizer = torch.optim.Adam(module.soft_prompts.parameters(), lr=1e-2)
    batch = next(iter(pairs.train_dataloader()))
    for _ in range(2):
        loss, _ = dpo.step(module.model, batch, BETA)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        trained = dpo.step(module.model, batch, BETA)[1]["reward_margin"]
    adapter = peft_format.load_adapter(module.export(str(tmp_path / "adapter")), module.model.config)
    module.model.soft_prompts = None
    module.model.attach_adapter(adapter)
    with torch.no_grad():
        reloaded = dpo.step(module.model, batch, BETA)[1]["reward_margin"]
    assert abs(trained.item() - reloaded.item()) <= TOL and trained.item() != 0
