"""Speculative decoding over real loopback swarms: the same tokens as plain decoding, the target's distribution
when sampling, and caches that roll back exactly (also across a server's death)."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from swarmtune import generate, launch
from swarmtune.api.batching import Batcher, Sampling, Sequence, Variant
from swarmtune.client.config import ClientConfig
from swarmtune.client.inference import InferenceSession
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.client.speculative import DraftLength, accept
from swarmtune.errors import UserError
from swarmtune.local_swarm import LocalSwarm
from swarmtune.models import load_client_parts
from swarmtune.tiny_model import make_tiny_model, tiny_config
from tests.helpers import reference_model
from tests.test_export import random_lora

PROMPT = "The swarm is a group of computers that"
NEW_TOKENS = 20


def _fixed(k: int) -> DraftLength:
    """A draft length that does not adapt: on loopback a draft often costs more than it saves, and
    these tests are about what speculation computes, not whether it pays (benchmarks/speculative.py)."""
    return DraftLength(min_tokens=k, initial=k, max_tokens=k)


def _simulate(length: DraftLength, acceptance: float, step: float, draft: float, rounds: int = 40) -> list[int]:
    """The draft lengths chosen over `rounds` rounds of a draft accepted per token with `acceptance`."""
    generator, chosen = torch.Generator().manual_seed(0), []
    for _ in range(rounds):
        k = length.next
        chosen.append(k)
        kept = next((i for i in range(k) if float(torch.rand((), generator=generator)) > acceptance), k)
        length.observe(k, kept)
        length.timed(k, draft * k, step + 1e-5 * (k + 1))
    return chosen


def test_draft_length_follows_acceptance_and_costs():
    far = _simulate(DraftLength(), acceptance=0.9, step=0.2, draft=0.002)  # a long round trip, a good draft
    assert min(far[10:]) >= 8
    near = DraftLength()
    fast = _simulate(near, acceptance=0.3, step=0.002, draft=0.002)  # loopback, a poor draft: plain decoding
    assert fast[-16:].count(0) >= 14 and 1 in fast[-16:]             # with a probe now and then
    assert 0.15 < near.acceptance_total < 0.45


def _drafts(path: str, tmp_path_factory) -> dict[str, torch.nn.Module]:
    """Drafts that always agree (the target itself), sometimes (its first two blocks), and almost never
    (another random model with the same vocabulary, its LM head's rows rolled by one: a tied-embedding
    model tends to predict its input token, and so would agree with another such model)."""
    family = AutoModelForCausalLM.from_pretrained(path).config.model_type
    other = make_tiny_model(family, str(tmp_path_factory.mktemp(f"draft-{family}")), layers=2, seed=7)
    attn = "eager" if family == "bloom" else "sdpa"
    never = AutoModelForCausalLM.from_pretrained(other, attn_implementation=attn).eval()
    never.lm_head.weight = torch.nn.Parameter(never.lm_head.weight.detach().roll(1, 0).clone())
    return {"same": reference_model(path),
            "first_blocks": AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=2,
                                                                 attn_implementation=attn).eval(),
            "never": never}


@pytest.fixture(scope="module")
def swarm(tiny_llama):
    """Two servers splitting the llama; tests that kill a server add a third holding all of it."""
    with LocalSwarm(tiny_llama, spans=[(0, 3), (3, 6)]) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def client(swarm, tiny_llama):
    config = ClientConfig(initial_peers=swarm.initial_peers, step_timeout=5.0, ban_base=1.0)
    model = SwarmForCausalLM.from_pretrained(tiny_llama, client_config=config)
    yield model
    model.close()


@pytest.fixture(scope="module")
def chained_client(swarm, tiny_llama):
    """A client whose steps always go server to server (on loopback they would go through the client)."""
    config = ClientConfig(initial_peers=swarm.initial_peers, step_timeout=5.0, chaining=True)
    model = SwarmForCausalLM.from_pretrained(tiny_llama, client_config=config)
    yield model
    model.close()


@pytest.fixture(scope="module")
def qwen2_client(tiny_models):
    path = tiny_models("qwen2")
    with LocalSwarm(path, spans=[(0, 2), (2, 6)]) as swarm:
        model = SwarmForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        yield model, path
        model.close()


@pytest.fixture(scope="module")
def llama_drafts(tiny_llama, tmp_path_factory):
    return _drafts(tiny_llama, tmp_path_factory)


def _greedy(model, path: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = AutoTokenizer.from_pretrained(path)([PROMPT], return_tensors="pt")
    args = dict(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return model.generate(**args, **kwargs), reference_model(path).generate(**args)


# qwen2: a swarm of its own; bloom (ALiBi): three drafts' generations, a minute on a loaded machine (its swarm
# generates in test_generation and test_serving)
@pytest.mark.parametrize("family", ["llama", *(pytest.param(f, marks=pytest.mark.slow) for f in ("qwen2", "bloom"))])
def test_greedy_speculation_gives_the_plain_greedy_tokens(family, request, tmp_path_factory):
    if family == "llama":
        model, path = request.getfixturevalue("client"), request.getfixturevalue("tiny_llama")
        drafts = request.getfixturevalue("llama_drafts")
    else:
        model, path = request.getfixturevalue(f"{family}_client")
        drafts = _drafts(path, tmp_path_factory)
    for name, draft in drafts.items():
        model.draft_length = _fixed(4)
        ours, expected = _greedy(model, path, assistant_model=draft)
        assert torch.equal(ours, expected), name
        stats = model.draft_length
        assert stats.drafted_total > 0
        if name == "same":
            assert stats.accepted_total == stats.drafted_total
            assert stats.rounds <= math.ceil(NEW_TOKENS / 5) + 1  # 4 drafts and 1 token of the target's per step
        if name == "never":
            assert stats.accepted_total <= 0.2 * stats.drafted_total
    model.draft_length = None  # the default, adaptive length: still the same tokens
    ours, expected = _greedy(model, path, assistant_model=drafts["first_blocks"])
    assert torch.equal(ours, expected)
    assert model.draft_length.rounds > 0


def test_greedy_speculation_over_chained_steps(chained_client, tiny_llama, llama_drafts):
    chained_client.draft_length = _fixed(3)  # one length for both drafts: its totals count both
    for name in ("same", "first_blocks"):  # drafts all kept, and mostly refused
        with chained_client.inference_session(64) as session:
            ours, expected = _greedy(chained_client, tiny_llama, assistant_model=llama_drafts[name])
            assert session.chainable(torch.zeros(1, 4, chained_client.config.hidden_size))
        assert torch.equal(ours, expected), name
    assert 0 < chained_client.draft_length.accepted_total < chained_client.draft_length.drafted_total


def test_greedy_speculation_with_client_lora(client, tiny_llama, llama_drafts):
    lora = random_lora(client.config, seed=3)
    plain_lora, client.lora = client.lora, lora
    try:
        inputs = AutoTokenizer.from_pretrained(tiny_llama)([PROMPT], return_tensors="pt")
        args = dict(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        expected = client.generate(**args)
        client.draft_length = _fixed(3)
        assert torch.equal(client.generate(**args, assistant_model=llama_drafts["first_blocks"]), expected)
        assert client.draft_length.drafted_total > 0  # drafts of the base model: the adapter's target rejects them
    finally:
        client.lora = plain_lora


class _KillAfter(BaseStreamer):
    """Kills a server when the generation has reported `rounds` chunks of tokens."""

    def __init__(self, server, rounds: int):
        self.server, self.rounds, self.seen = server, rounds, 0

    def put(self, value):
        self.seen += 1
        if self.seen == self.rounds:
            self.server.kill()

    def end(self):
        pass


def test_server_killed_mid_speculation_replays_only_kept_tokens(swarm, client, tiny_llama, llama_drafts):
    victim = swarm.add_server((0, 6))  # one hop beats two: the session starts on it
    try:
        client.connection.refresh()
        client.draft_length = _fixed(4)
        streamer = _KillAfter(victim, 3)
        ours, expected = _greedy(client, tiny_llama, assistant_model=llama_drafts["first_blocks"], streamer=streamer)
        assert victim.proc.poll() is not None
        assert torch.equal(ours, expected)
    finally:
        victim.stop()


@pytest.mark.parametrize("steps", ["relayed", "chained"])
def test_rollback_leaves_the_session_as_a_fresh_one(steps, request):
    """A rolled-back session's next steps equal those of a session that never saw the dropped tokens,
    per row, with a second rollback before the next step."""
    client = request.getfixturevalue("client" if steps == "relayed" else "chained_client")
    hidden = client.config.hidden_size
    torch.manual_seed(0)
    seen, new = torch.randn(2, 8, hidden), torch.randn(2, 2, hidden)
    keep = [5, 7]
    with InferenceSession(client.connection, max_length=16, batch_size=2) as session:
        session.step(seen[:, :4])
        session.step(seen[:, 4:])
        session.rollback(7)
        session.rollback(torch.tensor(keep))
        assert session.length == 7
        positions = torch.tensor([[5, 6], [7, 8]])
        out = session.step(new, position_ids=positions)
    for row, kept in enumerate(keep):
        with InferenceSession(client.connection, max_length=16, batch_size=1) as fresh:
            fresh.step(seen[row:row + 1, :kept])
            alone = fresh.step(new[row:row + 1])
        torch.testing.assert_close(out[row:row + 1], alone, rtol=1e-5, atol=1e-5)


def test_rollback_beyond_the_session_is_refused(client):
    with InferenceSession(client.connection, max_length=8, batch_size=1) as session:
        session.step(torch.randn(1, 3, client.config.hidden_size))
        with pytest.raises(ValueError, match="rollback"):
            session.rollback(4)


def _run_batcher(batcher: Batcher, sequences: list[tuple[list[int], Sampling]], timeout: float = 120,
                 eos: set[int] | None = None) -> list[list[int]]:
    """Each sequence's generated tokens, all submitted at once."""
    results: list[list[int]] = [[] for _ in sequences]
    done = [threading.Event() for _ in sequences]
    errors: list[Exception] = []

    def emitter(i: int):
        def emit(event):
            if hasattr(event, "id"):
                results[i].append(event.id)
            else:
                if isinstance(event, Exception):
                    errors.append(event)
                done[i].set()
        return emit

    for i, (prompt, sampling) in enumerate(sequences):
        batcher.submit(Sequence(prompt, sampling, eos or set(), emitter(i)))
    for event in done:
        assert event.wait(timeout)
    assert not errors, errors[:3]
    return results


def test_batched_speculation_gives_each_request_its_plain_greedy_tokens(client, tiny_llama, llama_drafts):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [tokenizer(p)["input_ids"] for p in ["A cat", PROMPT, "Honey", "Bees make honey from the nectar of",
                                                  "Q:", "Why", "Flowers and bees and", "The quick brown fox"]]
    lengths = [6, 12, 9, 16, 5, 11, 8, 14]
    ref = reference_model(tiny_llama)
    expected = [ref.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
                for p, n in zip(prompts, lengths)]
    batcher = Batcher(client.connection, client.parts, Variant("base"), max_rows=4, draft=llama_drafts["first_blocks"])
    batcher.draft_length = _fixed(3)
    try:
        got = _run_batcher(batcher, [(p, Sampling(n, temperature=0)) for p, n in zip(prompts, lengths)],
                           eos={tokenizer.eos_token_id})
    finally:
        batcher.close()
    assert got == expected
    assert 0 < batcher.draft_length.accepted_total < batcher.draft_length.drafted_total  # both paths taken
    assert batcher.steps < sum(lengths) / 4 + len(prompts)  # more than one token per row and step, on average


def test_accept_rule_samples_the_target_distribution():
    """Speculative sampling's rule on fixed distributions, against its target, with a control that must fail."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])
    q = torch.tensor([0.1, 0.1, 0.4, 0.4])
    n = 20_000
    first, second = torch.zeros(4), torch.zeros(4)
    naive = torch.zeros(4)
    for _ in range(n):
        token = int(torch.multinomial(q, 1, generator=generator))
        out = accept([token], [q], p, generator)
        first[out[0]] += 1
        if len(out) == 2:  # the draft was accepted: the second token is the target's next one
            second[out[1]] += 1
        naive[token] += 1  # keeping every draft samples the draft, not the target
    assert _chi2_p(first, p[0]) > 1e-3
    kept = int(second.sum())
    assert kept > 0.3 * n
    assert _chi2_p(second, p[1]) > 1e-3
    assert _chi2_p(naive, p[0]) < 1e-6


def _chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of Pearson's chi-square test of `counts` against `probs` (cells of expected count >= 5)."""
    expected = probs.double() * counts.sum()
    cells = expected >= 5
    observed, expected = counts[cells].double(), expected[cells]
    expected = expected * observed.sum() / expected.sum()
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(cells.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))  # the chi-square distribution's survival


@pytest.fixture(scope="module")
def tiny_vocab_models(tmp_path_factory) -> dict[str, str]:
    """A target and a draft with 12 tokens and peaked distributions."""
    root = tmp_path_factory.mktemp("tiny-vocab")
    models = {}
    for name, seed, scale in (("target", 0, 12.0), ("draft", 1, 8.0)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config("llama", layers=2, vocab_size=12))
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
        model.save_pretrained(str(root / name))
        models[name] = str(root / name)
    return models


@pytest.fixture(scope="module")
def tiny_vocab(tiny_vocab_models):
    """The tiny-vocabulary models, and a swarm of the target."""
    with LocalSwarm(tiny_vocab_models["target"], spans=[(0, 2)]) as swarm:
        yield tiny_vocab_models, swarm


@pytest.mark.slow  # a statistical test: hundreds of sampled requests
def test_batched_speculative_sampling_matches_the_target_distribution(tiny_vocab):
    """The first two sampled tokens, drawn through drafts of one token, against the target's exact marginals."""
    models, swarm = tiny_vocab
    target = reference_model(models["target"])
    draft = AutoModelForCausalLM.from_pretrained(models["draft"], attn_implementation="sdpa").eval()
    prompt = [1, 5, 7]
    with torch.no_grad():
        p1 = target(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        p2 = sum(p1[t] * target(torch.tensor([prompt + [t]])).logits[0, -1].softmax(-1) for t in range(12))
    model = SwarmForCausalLM.from_pretrained(models["target"], initial_peers=swarm.initial_peers)
    batcher = Batcher(model.connection, load_client_parts(models["target"]), Variant("base"), max_rows=32,
                      draft=draft)
    batcher.draft_length = _fixed(1)
    n = 640
    try:
        got = _run_batcher(batcher, [(prompt, Sampling(2, temperature=1.0, seed=i)) for i in range(n)], timeout=300)
    finally:
        batcher.close()
        model.close()
    assert all(len(g) == 2 for g in got), [g for g in got if len(g) != 2][:5]
    first = torch.bincount(torch.tensor([g[0] for g in got]), minlength=12).float()
    second = torch.bincount(torch.tensor([g[1] for g in got]), minlength=12).float()
    assert 0 < batcher.draft_length.accepted_total < batcher.draft_length.drafted_total
    assert _chi2_p(first, p1) > 1e-3, (first, p1 * n)
    assert _chi2_p(second, p2) > 1e-3, (second, p2 * n)


def test_generate_entry_point_with_a_draft(swarm, tiny_llama, capsys):
    overrides = [f"model.path={tiny_llama}", f"swarm.initial_peers=[{','.join(swarm.initial_peers)}]",
                 "generation.max_new_tokens=12", f"prompt={PROMPT}"]
    with launch.composed("generate", overrides) as cfg:
        plain = generate.run(cfg)
    with launch.composed("generate", [*overrides, f"generation.draft={tiny_llama}"]) as cfg:
        assert generate.run(cfg) == plain


def test_a_draft_with_another_vocabulary_is_a_user_error(tiny_llama, tiny_vocab_models):
    models = tiny_vocab_models
    overrides = [f"model.path={tiny_llama}", f"generation.draft={models['draft']}", "swarm.initial_peers=[]"]
    with launch.composed("generate", overrides) as cfg, pytest.raises(UserError, match="vocabulary of 12 tokens"):
        generate.run(cfg)
